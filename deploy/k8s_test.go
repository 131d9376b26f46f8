package deploy

import (
	"errors"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/otpflow/otpflow/platform"
	"go.yaml.in/yaml/v3"
)

// mebibytes reads a Kubernetes memory quantity written in Mi or Gi.
func mebibytes(q string) (int64, error) {
	for suffix, scale := range map[string]int64{"Mi": 1, "Gi": 1024} {
		if n, ok := strings.CutSuffix(q, suffix); ok {
			v, err := strconv.ParseInt(n, 10, 64)
			return v * scale, err
		}
	}
	return 0, errors.New("quantity " + strconv.Quote(q) + ": write it in Mi or Gi")
}

// intOrString is a Kubernetes IntOrString (a port by number or name, a PDB count).
type intOrString string

func (v *intOrString) UnmarshalYAML(n *yaml.Node) error { *v = intOrString(n.Value); return nil }

type meta struct {
	Name        string
	Namespace   string
	Labels      map[string]string
	Annotations map[string]string
}

type object struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string
	Metadata   meta
	Data       map[string]string
	Spec       yaml.Node
	file       string
}

type podTemplate struct {
	Metadata meta
	Spec     podSpec
}

type podSpec struct {
	RestartPolicy   string `yaml:"restartPolicy"`
	SecurityContext struct {
		RunAsNonRoot *bool  `yaml:"runAsNonRoot"`
		RunAsUser    *int64 `yaml:"runAsUser"`
	} `yaml:"securityContext"`
	Containers []container
	Volumes    []volume
}

type volume struct {
	Name   string
	Secret *struct {
		SecretName  string `yaml:"secretName"`
		DefaultMode *int   `yaml:"defaultMode"`
		Items       []struct {
			Key, Path string
			Mode      *int
		}
	}
}

type containerPort struct {
	Name          string
	ContainerPort int `yaml:"containerPort"`
}

type container struct {
	Name    string
	Image   string
	Command []string
	Ports   []containerPort
	Env     []struct {
		Name      string
		Value     string
		ValueFrom *struct {
			ConfigMapKeyRef *keyRef `yaml:"configMapKeyRef"`
			SecretKeyRef    *keyRef `yaml:"secretKeyRef"`
		} `yaml:"valueFrom"`
	}
	EnvFrom []struct {
		ConfigMapRef *struct{ Name string } `yaml:"configMapRef"`
		SecretRef    *struct{ Name string } `yaml:"secretRef"`
	} `yaml:"envFrom"`
	LivenessProbe   *probe `yaml:"livenessProbe"`
	ReadinessProbe  *probe `yaml:"readinessProbe"`
	Resources       struct{ Requests, Limits map[string]string }
	SecurityContext struct {
		ReadOnlyRootFilesystem   *bool `yaml:"readOnlyRootFilesystem"`
		AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
	} `yaml:"securityContext"`
	VolumeMounts []struct {
		Name      string
		MountPath string `yaml:"mountPath"`
	} `yaml:"volumeMounts"`
}

type keyRef struct{ Name, Key string }

type probe struct {
	HTTPGet *struct {
		Path string
		Port intOrString
	} `yaml:"httpGet"`
}

// envValue is where a container's variable comes from: a literal (from the pod spec or a
// ConfigMap), or a Secret's key.
type envValue struct {
	literal string
	secret  *keyRef
}

// manifests are the objects of every file in deploy/k8s, by kind and name.
type manifests struct {
	objects []object
	byKind  map[string]map[string]*object
}

func parseManifests(f files) (*manifests, []error) {
	m := &manifests{byKind: map[string]map[string]*object{}}
	var errs []error
	var names []string
	for p := range f {
		if strings.HasPrefix(p, "k8s/") {
			names = append(names, p)
		}
	}
	sort.Strings(names)
	for _, p := range names {
		dec := yaml.NewDecoder(strings.NewReader(f[p]))
		for {
			var o object
			err := dec.Decode(&o)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				errs = append(errs, errorf("%s: %v", p, err))
				break
			}
			if o.Kind == "" {
				continue
			}
			o.file = p
			m.objects = append(m.objects, o)
		}
	}
	for i := range m.objects {
		o := &m.objects[i]
		if m.byKind[o.Kind] == nil {
			m.byKind[o.Kind] = map[string]*object{}
		}
		if _, dup := m.byKind[o.Kind][o.Metadata.Name]; dup {
			errs = append(errs, errorf("%s: %s %s is declared twice", o.file, o.Kind, o.Metadata.Name))
		}
		m.byKind[o.Kind][o.Metadata.Name] = o
	}
	return m, errs
}

func decodeSpec[T any](o *object) (T, error) {
	var v T
	err := o.Spec.Decode(&v)
	return v, err
}

type deploymentSpec struct {
	Replicas *int
	Strategy struct {
		RollingUpdate struct {
			MaxSurge       *intOrString `yaml:"maxSurge"`
			MaxUnavailable *intOrString `yaml:"maxUnavailable"`
		} `yaml:"rollingUpdate"`
	}
	Selector struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	}
	Template podTemplate
}

type jobSpec struct {
	BackoffLimit *int `yaml:"backoffLimit"`
	Template     podTemplate
}

type serviceSpec struct {
	Selector map[string]string
	Ports    []struct {
		Name       string
		Port       int
		TargetPort intOrString `yaml:"targetPort"`
	}
}

type pdbSpec struct {
	MinAvailable   *intOrString `yaml:"minAvailable"`
	MaxUnavailable *intOrString `yaml:"maxUnavailable"`
	Selector       struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	}
}

type scaledObjectSpec struct {
	ScaleTargetRef  struct{ Kind, Name string } `yaml:"scaleTargetRef"`
	MinReplicaCount *int                        `yaml:"minReplicaCount"`
	MaxReplicaCount *int                        `yaml:"maxReplicaCount"`
	Triggers        []struct {
		Type     string
		Metadata map[string]string
	}
}

// documentedSecrets reads the Secret table of deploy/README.md: name → keys.
func documentedSecrets(f files) map[string]map[string]bool {
	out := map[string]map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `(otpflow-[a-z0-9-]+)` \\| `([A-Za-z0-9._-]+)` \\|").FindAllStringSubmatch(f["README.md"], -1) {
		if out[m[1]] == nil {
			out[m[1]] = map[string]bool{}
		}
		out[m[1]][m[2]] = true
	}
	return out
}

func TestKubernetes(t *testing.T) {
	report(t, checkKubernetes(loadFiles(t), readCode(t)))
}

// checkKubernetes checks deploy/k8s: every workload (the four Deployments and the
// provisioning Job) against the ConfigMap, the documented Secrets, its volumes, the
// variables its binary reads and production's start checks; each Service, PDB and the
// KEDA ScaledObject against the Deployments; and the SES rate arithmetic.
func checkKubernetes(f files, src *code) []error {
	m, errs := parseManifests(f)
	fail := func(format string, args ...any) { errs = append(errs, errorf(format, args...)) }
	for _, o := range m.objects {
		if o.Kind != "Namespace" && o.Metadata.Namespace != "otpflow" {
			fail("%s: %s %s is not in namespace otpflow", o.file, o.Kind, o.Metadata.Name)
		}
	}
	if m.byKind["Namespace"]["otpflow"] == nil {
		fail("k8s: no Namespace otpflow")
	}
	secrets := documentedSecrets(f)
	if len(secrets) == 0 {
		fail("README.md: no Secret table")
	}
	var image string
	deployments := map[string]deploymentSpec{}
	for _, svc := range services {
		o := m.byKind["Deployment"][svc]
		if o == nil {
			fail("k8s: no Deployment %s", svc)
			continue
		}
		d, err := decodeSpec[deploymentSpec](o)
		if err != nil {
			fail("%s: Deployment %s: %v", o.file, svc, err)
			continue
		}
		deployments[svc] = d
		where := o.file + ": Deployment " + svc
		if !labelsMatch(d.Selector.MatchLabels, d.Template.Metadata.Labels) {
			fail("%s: selector %v does not match the pod labels %v", where, d.Selector.MatchLabels, d.Template.Metadata.Labels)
		}
		c := checkPod(where, svc, d.Template.Spec, m, secrets, src.env, fail)
		if c == nil {
			continue
		}
		if image == "" {
			image = c.Image
		} else if c.Image != image {
			fail("%s: image %q differs from the others' %q", where, c.Image, image)
		}
		checkProbes(where, c, fail)
		if _, ok := c.Resources.Requests["cpu"]; !ok {
			fail("%s: no cpu request", where)
		}
		if _, ok := c.Resources.Requests["memory"]; !ok {
			fail("%s: no memory request", where)
		}
		if _, ok := c.Resources.Limits["memory"]; !ok {
			fail("%s: no memory limit", where)
		}
		// The binary's heap may grow to platform.DefaultMemoryLimit (GOGC=400 within it,
		// unless the pod sets GOGC or GOMEMLIMIT): the request covers it and the runtime's
		// own memory beside it, so a node is never overcommitted by the design.
		req, rerr := mebibytes(c.Resources.Requests["memory"])
		limit, lerr := mebibytes(c.Resources.Limits["memory"])
		switch want := int64(platform.DefaultMemoryLimit>>20) + 32; {
		case rerr != nil || lerr != nil:
			fail("%s: memory: %v", where, errors.Join(rerr, lerr))
		case req < want:
			fail("%s: memory request %dMi, below the %dMi the default GOMEMLIMIT lets the process use", where, req, want)
		case limit < req:
			fail("%s: memory limit %dMi below the request %dMi", where, limit, req)
		}
	}

	if o := m.byKind["Job"]["otpflow-provision"]; o == nil {
		fail("k8s: no Job otpflow-provision")
	} else if j, err := decodeSpec[jobSpec](o); err != nil {
		fail("%s: %v", o.file, err)
	} else {
		where := o.file + ": Job otpflow-provision"
		c := checkPod(where, cli, j.Template.Spec, m, secrets, src.env, fail)
		if c != nil && !slices.Equal(c.Command, []string{cli, "provision"}) {
			fail("%s: command %q is not [otpflow provision]", where, c.Command)
		}
		if c != nil && image != "" && c.Image != image {
			fail("%s: image %q is not the services' %q", where, c.Image, image)
		}
		if rp := j.Template.Spec.RestartPolicy; rp != "OnFailure" && rp != "Never" {
			fail("%s: restartPolicy %q; a Job needs OnFailure or Never", where, rp)
		}
		if j.BackoffLimit == nil {
			fail("%s: no backoffLimit", where)
		}
	}

	errs = append(errs, checkServices(m, deployments)...)
	errs = append(errs, checkScaling(m, deployments, src)...)
	return errs
}

// checkPod checks one pod spec whose single container runs binary, and returns that
// container (nil when there is none to check further).
func checkPod(where, binary string, p podSpec, m *manifests, secrets map[string]map[string]bool, env envCatalog, fail func(string, ...any)) *container {
	if len(p.Containers) != 1 {
		fail("%s: %d containers, want 1", where, len(p.Containers))
		return nil
	}
	c := &p.Containers[0]
	if len(c.Command) == 0 || c.Command[0] != binary {
		fail("%s: command %q does not run %s", where, c.Command, binary)
	}
	if pinnedTag(c.Image) == "" && !strings.Contains(c.Image, "@sha256:") {
		fail("%s: image %q has no pinned tag or digest", where, c.Image)
	}
	sc := p.SecurityContext
	if sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.RunAsUser == nil || *sc.RunAsUser == 0 {
		fail("%s: the pod does not run as a non-root UID (runAsNonRoot: true, runAsUser: %d)", where, imageUID)
	}
	if r := c.SecurityContext.ReadOnlyRootFilesystem; r == nil || !*r {
		fail("%s: root file system is writable (readOnlyRootFilesystem: true)", where)
	}
	if a := c.SecurityContext.AllowPrivilegeEscalation; a == nil || *a {
		fail("%s: allowPrivilegeEscalation is not false", where)
	}

	vars, errs := resolveEnv(c, m, secrets)
	for _, err := range errs {
		fail("%s: %v", where, err)
	}
	names := make([]string, 0, len(vars))
	for n := range vars {
		names = append(names, n)
	}
	if u := env.unknown(binary, names); len(u) > 0 {
		fail("%s: sets %v, which the %s binary does not read", where, u, binary)
	}
	for _, n := range secretEnv {
		if v, ok := vars[n]; ok && v.secret == nil {
			fail("%s: %s is a value in a manifest; take it from a Secret (secretKeyRef)", where, n)
		}
	}
	if binary == cli {
		if vars["OTP_MIGRATE_DATABASE_URL"].secret == nil {
			fail("%s: OTP_MIGRATE_DATABASE_URL does not come from a Secret", where)
		}
	} else {
		for _, n := range append(slices.Clone(connectionEnv), requiredEnv[binary]...) {
			if v, ok := vars[n]; !ok || v.secret == nil && v.literal == "" {
				fail("%s: %s is not set", where, n)
			}
		}
		if _, port, err := net.SplitHostPort(vars["OTP_HTTP_ADDR"].literal); err != nil || !hasPort(c, intOrString(port)) {
			fail("%s: OTP_HTTP_ADDR %q is not on a containerPort", where, vars["OTP_HTTP_ADDR"].literal)
		}
	}
	checkProduction(where, binary, vars, fail)
	checkFiles(where, c, p, vars, secrets, fail)
	return c
}

// resolveEnv returns a container's variables: its envFrom ConfigMaps first, env over them,
// and an error for each reference to a ConfigMap key or Secret key that does not exist.
func resolveEnv(c *container, m *manifests, secrets map[string]map[string]bool) (map[string]envValue, []error) {
	var errs []error
	vars := map[string]envValue{}
	for _, ef := range c.EnvFrom {
		if ef.SecretRef != nil {
			errs = append(errs, errorf("envFrom Secret %s: name each key with secretKeyRef instead", ef.SecretRef.Name))
		}
		if ef.ConfigMapRef == nil {
			continue
		}
		cm := m.byKind["ConfigMap"][ef.ConfigMapRef.Name]
		if cm == nil {
			errs = append(errs, errorf("envFrom names ConfigMap %s, which no manifest declares", ef.ConfigMapRef.Name))
			continue
		}
		for k, v := range cm.Data {
			vars[k] = envValue{literal: v}
		}
	}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			vars[e.Name] = envValue{literal: e.Value}
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			cm := m.byKind["ConfigMap"][ref.Name]
			v, ok := "", false
			if cm != nil {
				v, ok = cm.Data[ref.Key]
			}
			if !ok {
				errs = append(errs, errorf("%s names key %s of ConfigMap %s, which no manifest declares", e.Name, ref.Key, ref.Name))
			}
			vars[e.Name] = envValue{literal: v}
		case e.ValueFrom.SecretKeyRef != nil:
			ref := e.ValueFrom.SecretKeyRef
			if !secrets[ref.Name][ref.Key] {
				errs = append(errs, errorf("%s names key %s of Secret %s, which deploy/README.md does not list", e.Name, ref.Key, ref.Name))
			}
			vars[e.Name] = envValue{secret: ref}
		}
	}
	return vars, errs
}

// checkProduction holds the settings to what OTP_ENV=production checks at start
// (platform/production.go): TLS to NATS and PostgreSQL, no sandbox provider, no plaintext
// SMTP or SES, no test recipients.
func checkProduction(where, binary string, vars map[string]envValue, fail func(string, ...any)) {
	lit := func(n string) string { return vars[n].literal }
	if lit("OTP_ENV") != "production" {
		fail("%s: OTP_ENV is %q, want production", where, lit("OTP_ENV"))
	}
	for _, n := range []string{"OTP_NATS_TLS_CA", "OTP_NATS_TLS_CERT", "OTP_NATS_TLS_KEY", "OTP_NATS_NKEY_FILE"} {
		if lit(n) == "" {
			fail("%s: %s is not set", where, n)
		}
	}
	for _, u := range strings.Split(lit("OTP_NATS_URL"), ",") {
		if !strings.HasPrefix(strings.TrimSpace(u), "tls://") {
			fail("%s: OTP_NATS_URL %q is not tls://", where, u)
		}
	}
	for _, n := range []string{"OTP_NATS_PLAINTEXT_OK", "OTP_ALLOW_TEST_RECIPIENTS"} {
		if lit(n) == "true" {
			fail("%s: %s=true", where, n)
		}
	}
	for _, n := range []string{"OTP_DATABASE_URL", "PGSSLMODE", "PGHOST"} {
		if n != "OTP_DATABASE_URL" && vars[n] != (envValue{}) {
			fail("%s: %s is set; put everything in OTP_DATABASE_URL", where, n)
		}
	}
	if binary != cli {
		u, err := url.Parse(lit("OTP_DATABASE_URL"))
		switch {
		case err != nil || u.Scheme != "postgres" && u.Scheme != "postgresql":
			fail("%s: OTP_DATABASE_URL is not a postgres:// URL", where)
		case u.Query().Get("sslmode") != "verify-full" || u.Query().Get("sslrootcert") == "":
			fail("%s: OTP_DATABASE_URL has sslmode=%q sslrootcert=%q, want verify-full with the server's CA", where, u.Query().Get("sslmode"), u.Query().Get("sslrootcert"))
		case u.User.Username() != "otpflow_"+binary:
			fail("%s: OTP_DATABASE_URL logs in as %q, not its own role otpflow_%s", where, u.User.Username(), binary)
		default:
			if _, hasPassword := u.User.Password(); hasPassword {
				fail("%s: OTP_DATABASE_URL carries a password in a manifest", where)
			}
		}
	}
	if p := lit("OTP_PROVIDERS"); slices.Contains(strings.Split(p, ","), "sandbox") || lit("OTP_SANDBOX_MAILDIR") != "" {
		fail("%s: the sandbox provider (OTP_PROVIDERS %q) is refused in production", where, p)
	}
	if s := lit("OTP_SMTP_URL"); s != "" {
		if u, err := url.Parse(s); err != nil || u.Query().Get("tls") == "none" {
			fail("%s: OTP_SMTP_URL %q is plaintext", where, s)
		}
	}
	for _, v := range []string{"OTP_SES_ENDPOINT", "OTP_SES_FEEDBACK_QUEUE_URL", "OTP_SQS_ENDPOINT"} {
		if s := lit(v); s != "" && !strings.HasPrefix(s, "https://") {
			fail("%s: %s %q is not https://", where, v, s)
		}
	}
}

// checkFiles checks that every file a variable names (TLS material, the nkey seed, the
// PostgreSQL certificates) is a key of a Secret volume mounted in the container.
func checkFiles(where string, c *container, p podSpec, vars map[string]envValue, secrets map[string]map[string]bool, fail func(string, ...any)) {
	mounted := map[string]string{} // file path → "secret/key"
	for _, vm := range c.VolumeMounts {
		i := slices.IndexFunc(p.Volumes, func(v volume) bool { return v.Name == vm.Name })
		if i < 0 {
			fail("%s: volumeMount %s names no volume of the pod", where, vm.Name)
			continue
		}
		v := p.Volumes[i]
		if v.Secret == nil {
			continue
		}
		if secrets[v.Secret.SecretName] == nil {
			fail("%s: volume %s mounts Secret %s, which deploy/README.md does not list", where, v.Name, v.Secret.SecretName)
		}
		if len(v.Secret.Items) == 0 {
			fail("%s: volume %s mounts Secret %s without items: name the keys it needs", where, v.Name, v.Secret.SecretName)
		}
		for _, it := range v.Secret.Items {
			if !secrets[v.Secret.SecretName][it.Key] {
				fail("%s: volume %s mounts key %s of Secret %s, which deploy/README.md does not list", where, v.Name, it.Key, v.Secret.SecretName)
			}
			mounted[path.Join(vm.MountPath, it.Path)] = v.Secret.SecretName + "/" + it.Key
		}
	}
	need := map[string]string{}
	for _, n := range []string{"OTP_NATS_TLS_CA", "OTP_NATS_TLS_CERT", "OTP_NATS_TLS_KEY", "OTP_NATS_NKEY_FILE", "OTP_NATS_CREDS", "OTP_TENANTS_FILE"} {
		if v := vars[n].literal; v != "" {
			need[n] = v
		}
	}
	if u, err := url.Parse(vars["OTP_DATABASE_URL"].literal); err == nil {
		for _, k := range []string{"sslrootcert", "sslcert", "sslkey"} {
			if v := u.Query().Get(k); v != "" {
				need["OTP_DATABASE_URL "+k] = v
			}
		}
	}
	for n, file := range need {
		if _, ok := mounted[file]; !ok {
			fail("%s: %s names %s, which no Secret volume of the container provides", where, n, file)
		}
	}
	if nkey := mounted[vars["OTP_NATS_NKEY_FILE"].literal]; nkey != "" && binary(c) != cli && !strings.HasSuffix(strings.Split(nkey, "/")[0], "-"+binary(c)) {
		fail("%s: OTP_NATS_NKEY_FILE is the seed of Secret %s, not the %s's own user", where, nkey, binary(c))
	}
	if v := vars["OTP_DATABASE_URL"].literal; v != "" && binary(c) != cli {
		u, _ := url.Parse(v)
		if cert := mounted[u.Query().Get("sslcert")]; cert != "" && !strings.HasSuffix(strings.Split(cert, "/")[0], "-"+binary(c)) {
			fail("%s: the PostgreSQL client certificate is Secret %s, not the %s's own", where, cert, binary(c))
		}
	}
}

func binary(c *container) string {
	if len(c.Command) == 0 {
		return ""
	}
	return c.Command[0]
}

// checkProbes checks liveness on /healthz and readiness on /readyz, on a container port.
func checkProbes(where string, c *container, fail func(string, ...any)) {
	for _, pr := range []struct {
		name, path string
		p          *probe
	}{{"livenessProbe", "/healthz", c.LivenessProbe}, {"readinessProbe", "/readyz", c.ReadinessProbe}} {
		if pr.p == nil || pr.p.HTTPGet == nil {
			fail("%s: no %s httpGet", where, pr.name)
			continue
		}
		if pr.p.HTTPGet.Path != pr.path {
			fail("%s: %s asks %s, want %s", where, pr.name, pr.p.HTTPGet.Path, pr.path)
		}
		if !hasPort(c, pr.p.HTTPGet.Port) {
			fail("%s: %s port %s is not a container port", where, pr.name, pr.p.HTTPGet.Port)
		}
	}
}

func hasPort(c *container, port intOrString) bool {
	for _, p := range c.Ports {
		if string(port) == p.Name || string(port) == strconv.Itoa(p.ContainerPort) {
			return true
		}
	}
	return false
}

func labelsMatch(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// checkServices checks each Service and PodDisruptionBudget against the Deployments.
func checkServices(m *manifests, deployments map[string]deploymentSpec) []error {
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, errorf(format, args...)) }
	for svc, d := range deployments {
		o := m.byKind["Service"][svc]
		if o == nil {
			fail("k8s: no Service %s", svc)
		} else if s, err := decodeSpec[serviceSpec](o); err != nil {
			fail("%s: %v", o.file, err)
		} else {
			if !labelsMatch(s.Selector, d.Template.Metadata.Labels) {
				fail("%s: Service %s selects %v, not the pods of Deployment %s", o.file, svc, s.Selector, svc)
			}
			for _, p := range s.Ports {
				if len(d.Template.Spec.Containers) == 0 || !hasPort(&d.Template.Spec.Containers[0], p.TargetPort) {
					fail("%s: Service %s targetPort %s is not a container port of Deployment %s", o.file, svc, p.TargetPort, svc)
				}
			}
		}
		o = m.byKind["PodDisruptionBudget"][svc]
		if o == nil {
			fail("k8s: no PodDisruptionBudget %s", svc)
			continue
		}
		pdb, err := decodeSpec[pdbSpec](o)
		if err != nil {
			fail("%s: %v", o.file, err)
			continue
		}
		if !labelsMatch(pdb.Selector.MatchLabels, d.Template.Metadata.Labels) {
			fail("%s: PodDisruptionBudget %s selects %v, not the pods of Deployment %s", o.file, svc, pdb.Selector.MatchLabels, svc)
		}
		replicas := 1
		if d.Replicas != nil {
			replicas = *d.Replicas
		} else if so := scaledObjectFor(m, svc); so != nil && so.MinReplicaCount != nil {
			replicas = *so.MinReplicaCount
		}
		switch {
		case pdb.MinAvailable != nil:
			n, err := strconv.Atoi(string(*pdb.MinAvailable))
			if err != nil || n < 1 || n >= replicas {
				fail("%s: PodDisruptionBudget %s minAvailable %s of %d replicas: want at least 1 and fewer than the replicas, or a drain never evicts", o.file, svc, *pdb.MinAvailable, replicas)
			}
		case pdb.MaxUnavailable == nil:
			fail("%s: PodDisruptionBudget %s sets neither minAvailable nor maxUnavailable", o.file, svc)
		}
	}
	return errs
}

func scaledObjectFor(m *manifests, deployment string) *scaledObjectSpec {
	for _, o := range m.byKind["ScaledObject"] {
		if so, err := decodeSpec[scaledObjectSpec](o); err == nil && so.ScaleTargetRef.Name == deployment {
			return &so
		}
	}
	return nil
}

// sesQuotaAnnotation on the ScaledObject is the SES account's MaxSendRate, that the
// dispatchers share.
const sesQuotaAnnotation = "otpflow.dev/ses-account-max-send-rate"

// checkScaling checks the KEDA ScaledObject: it scales the dispatcher Deployment on the
// dispatcher consumer of OTP_DISPATCH, keeps at least one, and maxReplicaCount dispatchers
// at OTP_SES_MAX_SEND_RATE each send exactly the account's quota.
func checkScaling(m *manifests, deployments map[string]deploymentSpec, src *code) []error {
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, errorf(format, args...)) }
	var o *object
	for _, so := range m.byKind["ScaledObject"] {
		o = so
	}
	if len(m.byKind["ScaledObject"]) != 1 || o == nil {
		return []error{errorf("k8s: want one ScaledObject, found %d", len(m.byKind["ScaledObject"]))}
	}
	so, err := decodeSpec[scaledObjectSpec](o)
	if err != nil {
		return []error{errorf("%s: %v", o.file, err)}
	}
	where := o.file + ": ScaledObject " + o.Metadata.Name
	d, ok := deployments[so.ScaleTargetRef.Name]
	if so.ScaleTargetRef.Name != "dispatcher" || !ok || so.ScaleTargetRef.Kind != "" && so.ScaleTargetRef.Kind != "Deployment" {
		fail("%s: scaleTargetRef %s %s is not the dispatcher Deployment", where, so.ScaleTargetRef.Kind, so.ScaleTargetRef.Name)
	}
	if d.Replicas != nil {
		fail("%s: Deployment dispatcher sets replicas, which fights KEDA over the count", where)
	}
	if so.MinReplicaCount == nil || *so.MinReplicaCount < 1 {
		fail("%s: minReplicaCount must be at least 1", where)
	}
	if so.MaxReplicaCount == nil || so.MinReplicaCount != nil && *so.MaxReplicaCount < *so.MinReplicaCount {
		fail("%s: maxReplicaCount is unset or below minReplicaCount", where)
		return errs
	}
	stream, consumer, account, https := "", "", "", ""
	for _, t := range so.Triggers {
		if t.Type == "nats-jetstream" {
			stream, consumer = t.Metadata["stream"], t.Metadata["consumer"]
			account, https = t.Metadata["account"], t.Metadata["useHttps"]
			if t.Metadata["natsServerMonitoringEndpoint"] == "" || t.Metadata["lagThreshold"] == "" {
				fail("%s: the nats-jetstream trigger needs natsServerMonitoringEndpoint and lagThreshold", where)
			}
		}
	}
	wantStream, wantConsumer := src.dispatchStream, src.dispatchConsumer
	if want, monitor, err := natsServiceAccount(); err != nil {
		fail("nats/nats-server.conf.tmpl: %v", err)
	} else {
		if account != want {
			fail("%s: the nats-jetstream trigger reads account %q; the streams (the dispatcher's consumer among them) are in account %s of nats/nats-server.conf.tmpl", where, account, want)
		}
		if wantHTTPS := map[string]string{"https": "true", "http": "false"}[monitor]; https != wantHTTPS && !(https == "" && monitor == "http") {
			fail("%s: useHttps %q, but the template's monitoring endpoint is %q", where, https, monitor)
		}
	}
	if stream != wantStream || consumer != wantConsumer {
		fail("%s: the nats-jetstream trigger watches %q/%q, not the dispatcher consumer %q of %q", where, stream, consumer, wantConsumer, wantStream)
	}
	quota, err := strconv.ParseFloat(o.Metadata.Annotations[sesQuotaAnnotation], 64)
	if err != nil || quota <= 0 {
		fail("%s: annotation %s (the SES account's send rate) is missing or not a positive number", where, sesQuotaAnnotation)
		return errs
	}
	rate := -1.0
	if len(d.Template.Spec.Containers) == 1 {
		for _, e := range d.Template.Spec.Containers[0].Env {
			if e.Name == "OTP_SES_MAX_SEND_RATE" {
				rate, _ = strconv.ParseFloat(e.Value, 64)
			}
		}
	}
	if want := sesRatePerReplica(quota, *so.MaxReplicaCount); math.Abs(rate-want) > 1e-9 {
		fail("k8s/dispatcher.yaml: OTP_SES_MAX_SEND_RATE is %v; the account's %v/s over maxReplicaCount %d is %v/s per dispatcher", rate, quota, *so.MaxReplicaCount, want)
	}
	// A rolling update runs up to maxReplicaCount + maxSurge dispatchers at once, each at
	// OTP_SES_MAX_SEND_RATE: together they too stay within the quota.
	surge, err := rolloutSurge(d.Strategy.RollingUpdate.MaxSurge, *so.MaxReplicaCount)
	if err != nil {
		fail("k8s/dispatcher.yaml: strategy.rollingUpdate.maxSurge: %v", err)
	} else if peak := float64(*so.MaxReplicaCount+surge) * rate; peak > quota+1e-9 {
		fail("k8s/dispatcher.yaml: a rollout runs maxReplicaCount %d + maxSurge %d dispatchers at %v/s each, %v/s, over the account's %v/s (use maxSurge: 0, maxUnavailable: 1)", *so.MaxReplicaCount, surge, rate, peak, quota)
	}
	return errs
}

// rolloutSurge is the number of pods a rolling update may add above replicas: maxSurge as a
// count or a percentage of replicas (rounded up, as Kubernetes does); unset is 25%.
func rolloutSurge(maxSurge *intOrString, replicas int) (int, error) {
	v := "25%"
	if maxSurge != nil {
		v = string(*maxSurge)
	}
	if pct, ok := strings.CutSuffix(v, "%"); ok {
		n, err := strconv.Atoi(pct)
		if err != nil || n < 0 {
			return 0, errorf("%q is not a percentage", v)
		}
		return (replicas*n + 99) / 100, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, errorf("%q is not a count", v)
	}
	return n, nil
}

func TestRolloutSurge(t *testing.T) {
	one, zero, pct := intOrString("1"), intOrString("0"), intOrString("25%")
	for _, tc := range []struct {
		surge    *intOrString
		replicas int
		want     int
	}{{&one, 10, 1}, {&zero, 10, 0}, {&pct, 10, 3}, {nil, 2, 1}, {&pct, 4, 1}} {
		if got, err := rolloutSurge(tc.surge, tc.replicas); err != nil || got != tc.want {
			t.Errorf("rolloutSurge(%v, %d) = %d, %v; want %d", tc.surge, tc.replicas, got, err, tc.want)
		}
	}
}

// natsServiceAccount reads nats/nats-server.conf.tmpl: the one account with JetStream
// enabled (where OTP_DISPATCH and its dispatcher consumer live) and whether monitoring is served over "http" or
// "https" ("" when not at all).
func natsServiceAccount() (account, monitor string, err error) {
	b, err := os.ReadFile(filepath.Join("nats", "nats-server.conf.tmpl"))
	if err != nil {
		return "", "", err
	}
	block := regexp.MustCompile(`^  ([A-Z][A-Z0-9_]*) \{\s*$`)
	in, current := false, ""
	for _, line := range strings.Split(string(b), "\n") {
		switch {
		case strings.HasPrefix(line, "https:"):
			monitor = "https"
		case strings.HasPrefix(line, "http:") && monitor == "":
			monitor = "http"
		case line == "accounts {":
			in = true
		case in && line == "}":
			in = false
		case in && block.MatchString(line):
			current = block.FindStringSubmatch(line)[1]
		case in && strings.TrimSpace(line) == "jetstream: enabled":
			if account != "" {
				return "", monitor, errorf("accounts %s and %s both have JetStream: which holds OTP_DISPATCH?", account, current)
			}
			account = current
		}
	}
	if account == "" {
		return "", monitor, errorf("no account has JetStream enabled")
	}
	return account, monitor, nil
}

// sesRatePerReplica is each dispatcher's share of the SES quota when all maxReplicas run.
func sesRatePerReplica(quota float64, maxReplicas int) float64 { return quota / float64(maxReplicas) }

func TestSESRateArithmetic(t *testing.T) {
	for _, tc := range []struct {
		name        string
		quota       float64
		maxReplicas int
		want        float64
	}{
		{"the manifests: 100/s over 10", 100, 10, 10},
		{"a fraction", 14, 4, 3.5},
		{"one replica takes it all", 50, 1, 50},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := sesRatePerReplica(tc.quota, tc.maxReplicas)
			if got != tc.want || got*float64(tc.maxReplicas) > tc.quota {
				t.Errorf("sesRatePerReplica(%v, %d) = %v, want %v (and never more than the quota together)", tc.quota, tc.maxReplicas, got, tc.want)
			}
		})
	}
}
