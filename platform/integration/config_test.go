package platform_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

func TestLoadCommonNamesTheBadVariable(t *testing.T) {
	for name, env := range map[string]map[string]string{
		"OTP_NATS_REPLICAS":             {"OTP_NATS_REPLICAS": "seven"},
		"OTP_SHUTDOWN_TIMEOUT":          {"OTP_SHUTDOWN_TIMEOUT": "-1s"},
		"OTP_CONNECT_TIMEOUT":           {"OTP_CONNECT_TIMEOUT": "soon"},
		"OTP_LOG_LEVEL":                 {"OTP_LOG_LEVEL": "loud"},
		"OTP_NATS_TLS_CERT":             {"OTP_NATS_TLS_CERT": "/c.pem"},
		"OTP_ENV":                       {"OTP_ENV": "staging"},
		"OTP_ALLOW_TEST_RECIPIENTS":     {"OTP_ALLOW_TEST_RECIPIENTS": "yes"},
		"OTP_NATS_PLAINTEXT_OK":         {"OTP_NATS_PLAINTEXT_OK": "1"},
		"OTP_REQUESTS_MAX_AGE":          {"OTP_REQUESTS_MAX_AGE": "30m"}, // shorter than the longest code lifetime
		"OTP_REQUESTS_MAX_AGE ":         {"OTP_REQUESTS_MAX_AGE": "48h"},
		"OTP_TENANT_STREAMS":            {"OTP_TENANT_STREAMS": "acme,otp.>"},
		"OTP_TENANT_REQUESTS_MAX_BYTES": {"OTP_TENANT_REQUESTS_MAX_BYTES": "1000"}, // smaller than one request
		"OTP_DB_MAX_CONNS":              {"OTP_DB_MAX_CONNS": "0"},
		"OTP_PPROF":                     {"OTP_PPROF": "on"},
	} {
		name = strings.TrimSpace(name)
		_, err := platform.LoadCommon(func(k string) string { return env[k] })
		var ce *platform.ConfigError
		if !errors.As(err, &ce) || ce.Var != name {
			t.Errorf("%s: err = %v", name, err)
		}
	}
	c, err := platform.LoadCommon(func(string) string { return "" })
	if err != nil || c.NATSURL != platform.DefaultNATSURL || c.Replicas != 1 || c.ConnectTimeout != 30*time.Second ||
		c.Env != platform.EnvDevelopment || c.Production() || c.AllowTestRecipients || c.NATSPlaintextOK {
		t.Fatalf("defaults: %+v %v", c, err)
	}
	prod := map[string]string{"OTP_ENV": "production", "OTP_ALLOW_TEST_RECIPIENTS": "true", "OTP_NATS_PLAINTEXT_OK": "true"}
	c, err = platform.LoadCommon(func(k string) string { return prod[k] })
	if err != nil || !c.Production() || !c.AllowTestRecipients || !c.NATSPlaintextOK {
		t.Fatalf("production: %+v %v", c, err)
	}
}

// TestRequestsMaxAge: OTP_REQUESTS keeps requests 1 h unless told otherwise, and every
// service applies the same bound to the stream.
func TestRequestsMaxAge(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want time.Duration
	}{{"", time.Hour}, {"3h", 3 * time.Hour}} {
		c, err := platform.LoadCommon(func(k string) string {
			if k == "OTP_REQUESTS_MAX_AGE" {
				return tc.env
			}
			return ""
		})
		testenv.Must(t, err, "load %q", tc.env)
		var age time.Duration
		for _, sc := range events.StreamConfigs(c.Streams()) {
			if sc.Name == events.StreamRequests {
				age = sc.MaxAge
			}
		}
		if c.RequestsMaxAge != tc.want || age != tc.want {
			t.Errorf("OTP_REQUESTS_MAX_AGE=%q: config %v, stream MaxAge %v, want %v", tc.env, c.RequestsMaxAge, age, tc.want)
		}
	}
}

func TestRedactDatabaseURL(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"postgres://app:s3cret@db.example.com:5432/otp?sslmode=require", "postgres://app:xxxxx@db.example.com:5432/otp?sslmode=require"},
		{"postgresql://app:p%40ss%2Fword@db/otp", "postgresql://app:xxxxx@db/otp"},
		{"postgres://app@db/otp?password=s3cret&sslmode=require", "postgres://app@db/otp?password=xxxxx&sslmode=require"},
		{"postgres://app@db/otp?sslpassword=s3cret", "postgres://app@db/otp?sslpassword=xxxxx"},
		{"postgres://app@db/otp", "postgres://app@db/otp"},
		{"host=db user=app password=s3cret dbname=otp", "host=db user=app password=xxxxx dbname=otp"},
		{"host=db password = 's3 c\\'ret' dbname=otp", "host=db password = xxxxx dbname=otp"},
		{"host=db PASSWORD=s3cret sslpassword=k3y", "host=db PASSWORD=xxxxx sslpassword=xxxxx"},
		{"postgres://app:s3cret@db:port/otp", "(a PostgreSQL URL that does not parse)"},
	} {
		got := platform.RedactDatabaseURL(tc.in)
		if got != tc.want || strings.Contains(got, "s3") || strings.Contains(got, "k3y") {
			t.Errorf("RedactDatabaseURL(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestOpenWaitsForNATS: a service started before its broker connects once the broker is up.
func TestOpenWaitsForNATS(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	c := platform.Common{NATSURL: "nats://127.0.0.1:" + strconv.Itoa(port), DatabaseURL: testenv.Database(t), ConnectTimeout: 20 * time.Second}
	go func() {
		time.Sleep(1500 * time.Millisecond)
		testenv.NATSAt(t, t.TempDir(), port)
	}()
	start := time.Now()
	d, err := platform.Open(context.Background(), c, "test", testenv.Logger(io.Discard))
	testenv.Must(t, err, "open")
	defer d.Close()
	if waited := time.Since(start); waited < time.Second {
		t.Fatalf("connected after %v, before the server started", waited)
	}
	c.NATSURL, c.ConnectTimeout = "nats://127.0.0.1:1", time.Second
	if _, err := platform.Open(context.Background(), c, "test", testenv.Logger(io.Discard)); err == nil {
		t.Fatal("connected to nothing")
	}
}

// TestTenantStreamsSetting: OTP_TENANT_STREAMS names the tenants that get a request stream
// of their own, in any order, separated by commas or spaces; provisioning then makes
// OTP_REQUESTS source them, and each is bounded by OTP_TENANT_REQUESTS_MAX_BYTES.
func TestTenantStreamsSetting(t *testing.T) {
	env := map[string]string{"OTP_TENANT_STREAMS": " globex, acme  initech,acme", "OTP_TENANT_REQUESTS_MAX_BYTES": "1048576"}
	c, err := platform.LoadCommon(func(k string) string { return env[k] })
	testenv.Must(t, err, "load")
	var got []string
	var sources []string
	for _, sc := range events.StreamConfigs(c.Streams()) {
		if sc.Name == events.StreamRequests {
			for _, s := range sc.Sources {
				sources = append(sources, s.Name)
			}
			if len(sc.Subjects) != 0 || sc.Duplicates != 0 {
				t.Errorf("OTP_REQUESTS with tenant streams: subjects %v, duplicate window %v", sc.Subjects, sc.Duplicates)
			}
			continue
		}
		if events.IsRequestsStream(sc.Name) {
			got = append(got, sc.Name+" "+strings.Join(sc.Subjects, ","))
			if sc.MaxBytes != 1<<20 || sc.Discard != jetstream.DiscardNew || sc.Duplicates != events.DuplicateWindow || sc.MaxMsgSize != events.RequestsMaxMsgSize {
				t.Errorf("%s: %+v", sc.Name, sc)
			}
		}
	}
	want := []string{"OTP_REQUESTS_acme otp.requested.acme", "OTP_REQUESTS_globex otp.requested.globex", "OTP_REQUESTS_initech otp.requested.initech"}
	if !slices.Equal(got, want) || !slices.Equal(sources, []string{"OTP_REQUESTS_acme", "OTP_REQUESTS_globex", "OTP_REQUESTS_initech"}) {
		t.Fatalf("tenant streams %v sourced as %v, want %v", got, sources, want)
	}
	c, err = platform.LoadCommon(func(string) string { return "" })
	testenv.Must(t, err, "load")
	if cfgs := events.StreamConfigs(c.Streams()); cfgs[0].Name != events.StreamRequests || !slices.Equal(cfgs[0].Subjects, []string{"otp.requested.*"}) || len(cfgs[0].Sources) != 0 {
		t.Fatalf("without OTP_TENANT_STREAMS OTP_REQUESTS is %+v", cfgs[0])
	}
	for _, name := range []string{events.StreamRequests, "OTP_REQUESTS_acme"} {
		if !events.IsRequestsStream(name) {
			t.Errorf("%s is not a request stream", name)
		}
	}
	for _, name := range []string{"OTP_REQUESTS_", "OTP_REQUESTS_a.b", events.StreamEvents, "OTP_REQUESTSX"} {
		if events.IsRequestsStream(name) {
			t.Errorf("%s is a request stream", name)
		}
	}
}

// TestServicePoolSize: a service's pool holds up to 16 connections by default (pgx's
// own default, 4 on a 2-core machine, let the verifier verify 4 codes at a time),
// OTP_DB_MAX_CONNS sets it, and pool_max_conns in the URL wins over both.
func TestServicePoolSize(t *testing.T) {
	url := testenv.AdminDatabaseURL()
	sep := "?"
	if strings.Contains(url, "?") {
		sep = "&"
	}
	for _, tc := range []struct {
		env  map[string]string
		want int32
	}{
		{map[string]string{"OTP_DATABASE_URL": url}, 16},
		{map[string]string{"OTP_DATABASE_URL": url, "OTP_DB_MAX_CONNS": "40"}, 40},
		{map[string]string{"OTP_DATABASE_URL": url + sep + "pool_max_conns=3", "OTP_DB_MAX_CONNS": "40"}, 3},
	} {
		c, err := platform.LoadCommon(func(k string) string { return tc.env[k] })
		testenv.Must(t, err, "LoadCommon")
		pool, err := platform.OpenPostgresPool(context.Background(), c.DatabaseURL, c.DBMaxConns)
		testenv.Must(t, err, "open")
		if got := pool.Config().MaxConns; got != tc.want {
			t.Errorf("%v: pool of %d, want %d", tc.env, got, tc.want)
		}
		pool.Close()
	}
}

// TestProfilesOnlyWhenAsked: the ops endpoint serves Go's profiles only with OTP_PPROF
// (WithPprof), and then beside /metrics.
func TestProfilesOnlyWhenAsked(t *testing.T) {
	ops := platform.OpsHandler(platform.NewRegistry(), nil)
	get := func(h http.Handler, path string) int {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		return rec.Code
	}
	if code := get(ops, "/debug/pprof/allocs"); code != http.StatusNotFound {
		t.Errorf("profiles without OTP_PPROF: %d", code)
	}
	with := platform.WithPprof(ops)
	for path, want := range map[string]int{"/debug/pprof/allocs": 200, "/debug/pprof/goroutine": 200, "/debug/pprof/profile?seconds=1": 200,
		"/debug/pprof/profile?seconds=999": 400, "/debug/pprof/nothing": 404, "/metrics": 200} {
		if code := get(with, path); code != want {
			t.Errorf("GET %s: %d, want %d", path, code, want)
		}
	}
}
