package platform

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ConnectNATS connects as service svc. Replies come to the inbox prefix "_INBOX_<svc>", so
// the NATS permissions of each service can allow only its own inbox.
func ConnectNATS(c Common, svc string, log *slog.Logger) (*nats.Conn, error) {
	return ConnectNATSJudging(c, svc, log, IsLocalHost)
}

// ConnectNATSJudging is ConnectNATS with the caller's judgement of which hosts are local
// (IsLocalHost for ConnectNATS): the production rules require TLS to every other host.
// Tests use it to treat a loopback server as remote.
func ConnectNATSJudging(c Common, svc string, log *slog.Logger, local func(host string) bool) (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name("otpflow-" + svc),
		nats.CustomInboxPrefix("_INBOX_" + svc),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.Timeout(5 * time.Second),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Error("nats async error", "subject", subject, "err", err)
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("nats reconnected", "url", nc.ConnectedUrlRedacted())
			if c.Production() && !c.NATSPlaintextOK {
				// The check of the first connection holds for every later one: a
				// reconnect that lands on a remote server in plaintext closes the
				// connection (the service stops) rather than talk in the clear.
				host, state := NATSPeer(nc)
				if err := checkNATSTLS(host, state, false, local); err != nil {
					log.Error("nats reconnected without TLS; closing", "err", err)
					nc.Close()
				}
			}
		}),
	}
	if c.Production() && !c.NATSPlaintextOK && anyRemote(c.NATSURL, local) {
		// nats.go upgrades to TLS when a server asks for it, but remembers nothing: a
		// reconnect to a server that does not ask would go plaintext. Require it.
		opts = append(opts, nats.Secure())
	}
	opts = append(opts, NATSCredentials(c)...)
	nc, err := nats.Connect(c.NATSURL, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to NATS at %s: %w", redactURL(c.NATSURL), ExplainTLS(err, NATSTrust(c)))
	}
	return nc, nil
}

// DefaultJSAPIPrefix is the JetStream API of the account a process logs into.
const DefaultJSAPIPrefix = jetstream.DefaultAPIPrefix

// CheckJSAPIPrefix refuses an OTP_NATS_JS_API_PREFIX that is not a literal subject: empty
// tokens, wildcards or white space.
func CheckJSAPIPrefix(prefix string) error {
	p := strings.TrimSuffix(prefix, ".")
	for _, tok := range strings.Split(p, ".") {
		if tok == "" || tok == "*" || tok == ">" || strings.ContainsAny(tok, " \t\r\n") {
			return &ConfigError{"OTP_NATS_JS_API_PREFIX", fmt.Sprintf("%q is not a subject prefix such as $JS.API or JS.OTPFLOW.API", prefix)}
		}
	}
	return nil
}

// NewJetStream is the JetStream API on nc under prefix (Common.NATSJSAPIPrefix; empty is
// the default $JS.API), with opts.
func NewJetStream(nc *nats.Conn, prefix string, opts ...jetstream.JetStreamOpt) (jetstream.JetStream, error) {
	if prefix == "" || strings.TrimSuffix(prefix, ".") == strings.TrimSuffix(DefaultJSAPIPrefix, ".") {
		return jetstream.New(nc, opts...)
	}
	if err := CheckJSAPIPrefix(prefix); err != nil {
		return nil, err
	}
	return jetstream.NewWithAPIPrefix(nc, strings.TrimSuffix(prefix, "."), opts...)
}

// NATSCredentials are the options of OTP_NATS_CREDS, OTP_NATS_NKEY_FILE, OTP_NATS_TLS_CA,
// OTP_NATS_TLS_CERT and OTP_NATS_TLS_KEY, for the services and the CLI alike. The seed
// file is read when connecting, so a rotated seed takes effect at the next start.
func NATSCredentials(c Common) []nats.Option {
	var opts []nats.Option
	if c.NATSCreds != "" {
		opts = append(opts, nats.UserCredentials(c.NATSCreds))
	}
	if c.NATSNkeyFile != "" {
		opts = append(opts, func(o *nats.Options) error {
			opt, err := nats.NkeyOptionFromSeed(c.NATSNkeyFile)
			if err != nil {
				return &ConfigError{"OTP_NATS_NKEY_FILE", err.Error()}
			}
			return opt(o)
		})
	}
	if c.NATSTLSCA != "" {
		opts = append(opts, nats.RootCAs(c.NATSTLSCA))
	}
	if c.NATSTLSCert != "" {
		opts = append(opts, nats.ClientCert(c.NATSTLSCert, c.NATSTLSKey))
	}
	return opts
}

// CheckNATSAuth refuses more than one way to authenticate to NATS (OTP_NATS_CREDS,
// OTP_NATS_NKEY_FILE, a user or token in OTP_NATS_URL) and a seed file that cannot be
// read as an nkey user seed. In production it also refuses a seed file that other users
// of the machine may read.
func CheckNATSAuth(c Common) error {
	type way struct{ setting, what string }
	var ways []way
	if c.NATSCreds != "" {
		ways = append(ways, way{"OTP_NATS_CREDS", "OTP_NATS_CREDS"})
	}
	if c.NATSNkeyFile != "" {
		ways = append(ways, way{"OTP_NATS_NKEY_FILE", "OTP_NATS_NKEY_FILE"})
	}
	if urlHasUser(c.NATSURL) {
		ways = append(ways, way{"OTP_NATS_URL", "a user in OTP_NATS_URL"})
	}
	if len(ways) > 1 {
		return &ConfigError{ways[1].setting, ways[1].what + " is set together with " + ways[0].what + "; authenticate to NATS one way only"}
	}
	if c.NATSNkeyFile == "" {
		return nil
	}
	if _, err := nats.NkeyOptionFromSeed(c.NATSNkeyFile); err != nil {
		return &ConfigError{"OTP_NATS_NKEY_FILE", "cannot read an nkey user seed from " + c.NATSNkeyFile + ": " + err.Error()}
	}
	if c.Production() {
		if st, err := os.Stat(c.NATSNkeyFile); err == nil && !privateSeed(st) {
			return &ProductionError{"OTP_NATS_NKEY_FILE", fmt.Sprintf("%s has mode %04o: other users may read the seed; make it 0600 or 0400, or group-readable (0440) by this process's own group only (a Kubernetes secret with fsGroup set to the pod's runAsGroup)", c.NATSNkeyFile, st.Mode().Perm())}
		}
	}
	return nil
}

// privateSeed reports whether no one but this process's user, and at most its own group
// (read only), may read a seed file: 0600, 0400, or 0440 with the file's group the
// process's group, as a Kubernetes secret volume with fsGroup gives it.
func privateSeed(st os.FileInfo) bool {
	perm := st.Mode().Perm()
	switch {
	case perm&0o077 == 0:
		return true
	case perm&0o037 != 0: // group write or execute, or anything for others
		return false
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	return ok && int(sys.Gid) == os.Getegid()
}

// urlHasUser reports whether any server of a NATS URL list carries a user, password or
// token.
func urlHasUser(urls string) bool {
	for _, u := range strings.Split(urls, ",") {
		u = strings.TrimSpace(u)
		if !strings.Contains(u, "://") {
			u = "nats://" + u
		}
		if parsed, err := url.Parse(u); err == nil && parsed.User != nil {
			return true
		}
	}
	return false
}

// NATSTrust names the CA a NATS connection trusts, for messages.
func NATSTrust(c Common) string {
	if c.NATSTLSCA != "" {
		return "the CA in " + c.NATSTLSCA + " (OTP_NATS_TLS_CA)"
	}
	return "a CA of the system roots (OTP_NATS_TLS_CA is unset)"
}

// RedactNATSURL hides the user information of a NATS URL, for messages.
func RedactNATSURL(u string) string { return redactURL(u) }

// anyRemote reports whether any server of a NATS URL list is not local.
func anyRemote(urls string, local func(host string) bool) bool {
	for _, u := range strings.Split(urls, ",") {
		u = strings.TrimSpace(u)
		if !strings.Contains(u, "://") {
			u = "nats://" + u
		}
		parsed, err := url.Parse(u)
		if err != nil || !local(parsed.Hostname()) {
			return true
		}
	}
	return false
}

func redactURL(u string) string {
	if at := strings.LastIndexByte(u, '@'); at >= 0 {
		if scheme := strings.Index(u, "://"); scheme >= 0 && scheme < at {
			return u[:scheme+3] + "***" + u[at:]
		}
	}
	return u
}

// PublishTimeout bounds how long PublishAll waits for the stream's acknowledgements.
const PublishTimeout = 10 * time.Second

// PublishAll publishes msgs asynchronously and waits for every PubAck, at most
// PublishTimeout. A duplicate (same Nats-Msg-Id inside the window) counts as success.
func PublishAll(ctx context.Context, js jetstream.JetStream, msgs []*nats.Msg) error {
	if len(msgs) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, PublishTimeout)
	defer cancel()
	futures := make([]jetstream.PubAckFuture, 0, len(msgs))
	var errs []error
	for _, m := range msgs {
		f, err := js.PublishMsgAsync(m)
		if err != nil {
			errs = append(errs, fmt.Errorf("publish %s: %w", m.Subject, err))
			continue
		}
		futures = append(futures, f)
	}
	for _, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			errs = append(errs, fmt.Errorf("publish %s: %w", f.Msg().Subject, err))
		case <-ctx.Done():
			errs = append(errs, fmt.Errorf("publish %s: %w", f.Msg().Subject, ctx.Err()))
		}
	}
	return errors.Join(errs...)
}

// RetryDelay is the redelivery delay after the n-th failed delivery: exponential from
// 1 s, capped at max.
func RetryDelay(numDelivered uint64, max time.Duration) time.Duration {
	d := time.Second
	for i := uint64(1); i < numDelivered && d < max; i++ {
		d *= 2
	}
	return min(d, max)
}
