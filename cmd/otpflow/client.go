package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// serverFlags are the flags of every command that talks to NATS as an upstream app or an
// operator; url resolves them with natsURL, and dir is otpflow dev's state directory.
func serverFlags(fs *flag.FlagSet) (url func(getenv func(string) string) string, dir *string) {
	flagURL := fs.String("nats", "", "NATS URL (default: OTP_NATS_URL, the dev server, nats://127.0.0.1:4222)")
	dir = devDirFlag(fs)
	return func(getenv func(string) string) string { return natsURL(*flagURL, getenv, *dir) }, dir
}

// devDirFlag is the -dir flag: the state directory of otpflow dev.
func devDirFlag(fs *flag.FlagSet) *string {
	return fs.String("dir", ".otpflow", "state directory of otpflow dev (its URL and keys serve what the environment does not set)")
}

// withDevKeys is getenv, falling back for a variable it does not set to the keys otpflow
// dev keeps in dir/keys.env, so the walkthrough's operator commands need no exported
// secret. The environment always wins; without a dev directory nothing changes.
func withDevKeys(getenv func(string) string, dir string) func(string) string {
	devKeys := map[string]string{}
	if b, err := os.ReadFile(filepath.Join(dir, "keys.env")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				devKeys[k] = v
			}
		}
	}
	return func(k string) string {
		if v := getenv(k); v != "" {
			return v
		}
		return devKeys[k]
	}
}

// natsURL resolves the server an upstream-app command talks to: the flag, else
// OTP_NATS_URL, else the URL a running "otpflow dev" wrote, else the default.
func natsURL(flagValue string, getenv func(string) string, dir string) string {
	if flagValue != "" {
		return flagValue
	}
	if u := getenv("OTP_NATS_URL"); u != "" {
		return u
	}
	if b, err := os.ReadFile(filepath.Join(dir, "nats.url")); err == nil {
		return strings.TrimSpace(string(b))
	}
	return platform.DefaultNATSURL
}

// connectJetStream is connectClient with a JetStream context on the connection, under the
// API prefix OTP_NATS_JS_API_PREFIX (deploy/nats: the streams are in an account of their
// own, reached through imports under that prefix).
func connectJetStream(url string, getenv func(string) string) (*nats.Conn, jetstream.JetStream, error) {
	prefix := strings.TrimSpace(getenv("OTP_NATS_JS_API_PREFIX"))
	if prefix != "" {
		if err := platform.CheckJSAPIPrefix(prefix); err != nil {
			return nil, nil, err
		}
	}
	nc, err := connectClient(url, getenv)
	if err != nil {
		return nil, nil, err
	}
	js, err := platform.NewJetStream(nc, prefix)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}

func connectClient(url string, getenv func(string) string) (*nats.Conn, error) {
	c := platform.Common{NATSURL: url, NATSCreds: getenv("OTP_NATS_CREDS"), NATSNkeyFile: getenv("OTP_NATS_NKEY_FILE"),
		NATSTLSCA: getenv("OTP_NATS_TLS_CA"), NATSTLSCert: getenv("OTP_NATS_TLS_CERT"), NATSTLSKey: getenv("OTP_NATS_TLS_KEY")}
	if err := platform.CheckNATSAuth(c); err != nil {
		return nil, err
	}
	opts := append([]nats.Option{nats.Name("otpflow-cli"), nats.Timeout(5 * time.Second)}, platform.NATSCredentials(c)...)
	if inbox := strings.TrimSpace(getenv("OTP_NATS_INBOX_PREFIX")); inbox != "" {
		// A tenant app's user hears replies on _INBOX_<tenant> only (deploy/nats).
		if err := platform.CheckJSAPIPrefix(inbox); err != nil {
			return nil, &platform.ConfigError{Var: "OTP_NATS_INBOX_PREFIX", Msg: fmt.Sprintf("%q is not a subject prefix such as _INBOX_acme", inbox)}
		}
		opts = append(opts, nats.CustomInboxPrefix(inbox))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to NATS at %s: %w", platform.RedactNATSURL(url), platform.ExplainTLS(err, platform.NATSTrust(c)))
	}
	return nc, nil
}

func requestCommand(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := flag.NewFlagSet("request", flag.ContinueOnError)
	server, _ := serverFlags(fs)
	var (
		tenant    = fs.String("tenant", "demo", "tenant")
		requestID = fs.String("request-id", "", "idempotency key (default: random)")
		recipient = fs.String("recipient", "", "email address (required)")
		purpose   = fs.String("purpose", "login", "purpose")
		locale    = fs.String("locale", "", "locale of the mail")
		ttl       = fs.Int("ttl", 0, "code lifetime in seconds (0: default)")
		resend    = fs.Bool("resend", false, "ask for a fresh code on an existing request")
		session   = fs.String("session", "", "bind the code to this session id")
		ip        = fs.String("ip", "", "client IP of the end user")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *recipient == "" {
		return errors.New("request: -recipient is required")
	}
	if !events.ValidTenant(*tenant) {
		return errors.New("request: -tenant must be 1-64 of [A-Za-z0-9_-]")
	}
	if *requestID == "" {
		*requestID = "cli-" + randomHex(6)
	}
	req := events.Requested{RequestID: *requestID, Recipient: *recipient, Purpose: *purpose, Locale: *locale,
		TTLSeconds: *ttl, Resend: *resend, Context: events.RequestContext{SessionID: *session, IP: *ip}}
	data, err := json.Marshal(req)
	if err != nil {
		return err
	}
	nc, js, err := connectJetStream(server(getenv), getenv)
	if err != nil {
		return err
	}
	defer nc.Close()
	msgID := "requested:" + *tenant + ":" + *requestID
	if *resend {
		msgID += ":resend:" + randomHex(6)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ack, err := js.Publish(ctx, events.TypeRequested.Subject(*tenant), data, jetstream.WithMsgID(msgID))
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	fmt.Fprintf(stdout, "requested tenant=%s request_id=%s (stream %s seq %d)\n", *tenant, *requestID, ack.Stream, ack.Sequence)
	return nil
}

func verifyCommand(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) (bool, error) {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	server, _ := serverFlags(fs)
	var (
		tenant    = fs.String("tenant", "demo", "tenant")
		requestID = fs.String("request-id", "", "the request's idempotency key (required)")
		code      = fs.String("code", "", "the code the user typed (required)")
		session   = fs.String("session", "", "the session the code is bound to")
	)
	if err := fs.Parse(args); err != nil {
		return false, err
	}
	if *requestID == "" || *code == "" {
		return false, errors.New("verify: -request-id and -code are required")
	}
	data, err := json.Marshal(events.VerifyRequest{RequestID: *requestID, Code: *code, Context: events.VerifyContext{SessionID: *session}})
	if err != nil {
		return false, err
	}
	nc, err := connectClient(server(getenv), getenv)
	if err != nil {
		return false, err
	}
	defer nc.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	msg, err := nc.RequestWithContext(ctx, events.TypeVerify.Subject(*tenant), data)
	if err != nil {
		return false, fmt.Errorf("verify: %w", err)
	}
	if e := msg.Header.Get("Nats-Service-Error"); e != "" {
		return false, fmt.Errorf("verify: service error: %s", e)
	}
	var reply events.VerifyReply
	if err := json.Unmarshal(msg.Data, &reply); err != nil {
		return false, fmt.Errorf("verify: bad reply: %w", err)
	}
	fmt.Fprintln(stdout, string(msg.Data))
	return reply.Status == events.StatusVerified, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
