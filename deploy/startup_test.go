package deploy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"github.com/nats-io/nkeys"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/services/auditor"
	"github.com/otpflow/otpflow/services/dispatcher"
	"github.com/otpflow/otpflow/services/issuer"
	"github.com/otpflow/otpflow/services/verifier"
	"go.yaml.in/yaml/v3"
)

// The checks above read the files; these run the services' own start-up code on the
// environment the files give each container: the settings every service reads
// (platform.LoadCommon), the service's own (its ServiceSpec.Load, which applies the
// production checks of its settings), and, in production, the PostgreSQL TLS check that
// platform.Open makes before connecting. NATS TLS is judged on a live connection, so the
// static check (tls://, a CA, a client certificate) stands in for it.

var specs = map[string]platform.ServiceSpec{
	"issuer": issuer.Spec(), "dispatcher": dispatcher.Spec(), "verifier": verifier.Spec(), "auditor": auditor.Spec(),
}

// start runs a service's start-up checks, up to the first connection.
func start(svc string, env map[string]string) (platform.Common, error) {
	getenv := func(k string) string { return env[k] }
	common, err := platform.LoadCommon(getenv)
	if err != nil {
		return common, err
	}
	if _, err := specs[svc].Load(getenv, common); err != nil {
		return common, err
	}
	if common.Production() {
		return common, platform.CheckPostgresTLS(common.DatabaseURL)
	}
	return common, nil
}

// TestComposeStarts starts each compose service's configuration with the keys that
// deploy/dev-secrets.sh writes.
func TestComposeStarts(t *testing.T) {
	out, err := exec.Command("sh", "dev-secrets.sh").Output()
	if err != nil {
		t.Fatalf("sh dev-secrets.sh: %v", err)
	}
	dotenv := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(k, "#") {
			dotenv[k] = v
		}
	}
	var c composeFile
	if err := yaml.Unmarshal([]byte(loadFiles(t)["compose.yaml"]), &c); err != nil {
		t.Fatal(err)
	}
	interpolation := regexp.MustCompile(`\$\{([A-Z_]+)[^}]*\}`)
	for _, svc := range services {
		t.Run(svc, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range c.Services[svc].Environment {
				env[k] = interpolation.ReplaceAllStringFunc(v, func(s string) string {
					return dotenv[interpolation.FindStringSubmatch(s)[1]]
				})
			}
			common, err := start(svc, env)
			if err != nil {
				t.Fatalf("does not start: %v", err)
			}
			if common.Production() {
				t.Error("runs in production")
			}
		})
	}
}

// TestKubernetesStarts starts each Deployment's configuration in production, with stand-in
// values for its Secrets: fresh keys, the SMTP URL deploy/README.md describes, and TLS
// material written where the pod would mount it.
func TestKubernetesStarts(t *testing.T) {
	m, errs := parseManifests(loadFiles(t))
	report(t, errs)
	secrets := documentedSecrets(loadFiles(t))
	files := secretFiles(t)
	for _, svc := range services {
		t.Run(svc, func(t *testing.T) {
			root := t.TempDir()
			writeMounted(t, m, svc, root, files)
			env := kubernetesEnv(t, m, secrets, svc, root)
			common, err := start(svc, env)
			if err != nil {
				t.Fatalf("does not start: %v", err)
			}
			if !common.Production() {
				t.Error("does not run in production")
			}
		})
	}

	// The same start refuses what production refuses: it is not passing everything.
	for _, tc := range []struct{ svc, name, value string }{
		{"dispatcher", "OTP_PROVIDERS", "ses,sandbox"},
		{"dispatcher", "OTP_SMTP_URL", "smtp://relay.example.com:25?tls=none"},
		{"dispatcher", "OTP_SES_ENDPOINT", "http://ses.example.com"},
		{"issuer", "OTP_DATABASE_URL", "postgres://otpflow_issuer@db.example.com/otp?sslmode=prefer"},
	} {
		t.Run("refuses "+tc.name+"="+tc.value, func(t *testing.T) {
			root := t.TempDir()
			writeMounted(t, m, tc.svc, root, files)
			env := kubernetesEnv(t, m, secrets, tc.svc, root)
			env[tc.name] = tc.value
			_, err := start(tc.svc, env)
			var pe *platform.ProductionError
			if !errors.As(err, &pe) || pe.Setting != tc.name {
				t.Fatalf("start = %v, want a refusal of %s", err, tc.name)
			}
		})
	}

	// A seed Secret whose defaultMode lets others read it is refused: the files are
	// written with the manifest's modes, not with modes of the test's own choosing.
	t.Run("refuses a seed with defaultMode 0444", func(t *testing.T) {
		f := loadFiles(t)
		const declared = "secretName: otpflow-nats-nkey-dispatcher\n            defaultMode: 0400"
		if !strings.Contains(f["k8s/dispatcher.yaml"], declared) {
			t.Fatalf("k8s/dispatcher.yaml: no %q", declared)
		}
		f["k8s/dispatcher.yaml"] = strings.Replace(f["k8s/dispatcher.yaml"], declared, strings.Replace(declared, "0400", "0444", 1), 1)
		m, errs := parseManifests(f)
		report(t, errs)
		root := t.TempDir()
		writeMounted(t, m, "dispatcher", root, files)
		_, err := start("dispatcher", kubernetesEnv(t, m, secrets, "dispatcher", root))
		var pe *platform.ProductionError
		if !errors.As(err, &pe) || pe.Setting != "OTP_NATS_NKEY_FILE" {
			t.Fatalf("start = %v, want a refusal of OTP_NATS_NKEY_FILE", err)
		}
	})
}

// kubernetesEnv is the environment of svc's container: literals as they are, files under
// /etc/otpflow moved under root, and each Secret key replaced by a stand-in.
func kubernetesEnv(t *testing.T, m *manifests, secrets map[string]map[string]bool, svc, root string) map[string]string {
	t.Helper()
	d, err := decodeSpec[deploymentSpec](m.byKind["Deployment"][svc])
	if err != nil || len(d.Template.Spec.Containers) != 1 {
		t.Fatalf("Deployment %s: %v", svc, err)
	}
	vars, errs := resolveEnv(&d.Template.Spec.Containers[0], m, secrets)
	report(t, errs)
	env := map[string]string{}
	for name, v := range vars {
		if v.secret != nil {
			env[name] = standIn(t, *v.secret)
			continue
		}
		env[name] = strings.ReplaceAll(v.literal, "/etc/otpflow/", root+"/")
	}
	return env
}

// standIn returns a value of the shape the Secret's key holds (deploy/README.md).
func standIn(t *testing.T, ref keyRef) string {
	switch {
	case ref.Name == "otpflow-keys":
		return keys.Generate("k1", 32) // a fresh key each: no two keys shared
	case ref.Name == "otpflow-smtp" && ref.Key == "url":
		return "smtp://otp:password@smtp.example.com:587?tls=starttls"
	}
	t.Fatalf("no stand-in for key %s of Secret %s", ref.Key, ref.Name)
	return ""
}

// secretFiles returns the files the pods mount from Secrets, by volume/path: a CA and a
// client certificate signed by it in nats-tls/{ca.crt,tls.crt,tls.key}, pg-ca/ca.crt and
// pg-client/{tls.crt,tls.key}, and a fresh nkey user seed in nats-nkey/seed (the start
// checks read it).
func secretFiles(t *testing.T) map[string][]byte {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "otpflow"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	user, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	seed, err := user.Seed()
	if err != nil {
		t.Fatal(err)
	}
	return map[string][]byte{
		"nats-tls/ca.crt": caPEM, "nats-tls/tls.crt": certPEM, "nats-tls/tls.key": keyPEM,
		"pg-ca/ca.crt": caPEM, "pg-client/tls.crt": certPEM, "pg-client/tls.key": keyPEM,
		"nats-nkey/seed": seed,
	}
}

// writeMounted writes each file under root with the mode the service's Deployment gives
// it: the Secret volume's item mode, else its defaultMode, else Kubernetes' 0644. So the
// start checks (the nkey seed's, in production) judge the mode the manifest declares.
// The kubelet adds group read (0440) for a pod's fsGroup to every file of a Secret volume,
// with the fsGroup as the files' group; the start check accepts that when the group is the
// process's own (runAsGroup = fsGroup), which the written files' group (the test's) is.
func writeMounted(t *testing.T, m *manifests, svc, root string, files map[string][]byte) {
	t.Helper()
	d, err := decodeSpec[deploymentSpec](m.byKind["Deployment"][svc])
	if err != nil {
		t.Fatalf("Deployment %s: %v", svc, err)
	}
	for file, content := range files {
		mode, ok := secretFileMode(d.Template.Spec, file)
		if !ok {
			continue // not mounted by this Deployment
		}
		p := filepath.Join(root, file)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, content, 0o600); err != nil {
			t.Fatal(err)
		}
		// Chmod, not WriteFile's mode, which the umask would narrow.
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
	}
}

// secretFileMode is the mode a pod's Secret volume gives file (volume/path), and whether
// the pod mounts it.
func secretFileMode(p podSpec, file string) (os.FileMode, bool) {
	name, path, _ := strings.Cut(file, "/")
	for _, v := range p.Volumes {
		if v.Name != name || v.Secret == nil {
			continue
		}
		mode := 0o644 // the Kubernetes default
		if v.Secret.DefaultMode != nil {
			mode = *v.Secret.DefaultMode
		}
		if len(v.Secret.Items) == 0 {
			return os.FileMode(mode), true
		}
		for _, it := range v.Secret.Items {
			if it.Path == path {
				if it.Mode != nil {
					mode = *it.Mode
				}
				return os.FileMode(mode), true
			}
		}
	}
	return 0, false
}

func TestSecretFileMode(t *testing.T) {
	var p podSpec
	if err := yaml.Unmarshal([]byte(`
volumes:
  - name: a
    secret: {secretName: s, defaultMode: 0400, items: [{key: k, path: x}, {key: l, path: y, mode: 0600}]}
  - name: b
    secret: {secretName: s}
`), &p); err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]os.FileMode{"a/x": 0o400, "a/y": 0o600, "b/z": 0o644} {
		if got, ok := secretFileMode(p, file); !ok || got != want {
			t.Errorf("secretFileMode(%s) = %04o, %v; want %04o", file, got, ok, want)
		}
	}
	if _, ok := secretFileMode(p, "a/z"); ok {
		t.Error("a/z: a file the items leave out is mounted")
	}
}
