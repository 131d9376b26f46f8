package platform_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

func TestLoadCommonNamesTheBadVariable(t *testing.T) {
	for name, env := range map[string]map[string]string{
		"OTP_NATS_REPLICAS":    {"OTP_NATS_REPLICAS": "seven"},
		"OTP_SHUTDOWN_TIMEOUT": {"OTP_SHUTDOWN_TIMEOUT": "-1s"},
		"OTP_CONNECT_TIMEOUT":  {"OTP_CONNECT_TIMEOUT": "soon"},
		"OTP_LOG_LEVEL":        {"OTP_LOG_LEVEL": "loud"},
		"OTP_NATS_TLS_CERT":    {"OTP_NATS_TLS_CERT": "/c.pem"},
	} {
		_, err := platform.LoadCommon(func(k string) string { return env[k] })
		var ce *platform.ConfigError
		if !errors.As(err, &ce) || ce.Var != name {
			t.Errorf("%s: err = %v", name, err)
		}
	}
	c, err := platform.LoadCommon(func(string) string { return "" })
	if err != nil || c.NATSURL != platform.DefaultNATSURL || c.Replicas != 1 || c.ConnectTimeout != 30*time.Second {
		t.Fatalf("defaults: %+v %v", c, err)
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
