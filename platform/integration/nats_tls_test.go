package platform_test

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestNATSReconnectNeverDowngrades plays a man in the middle who, after a service started
// over TLS (the server required it, the client trusted it through the system roots and
// the URL said nats://), answers the reconnect with a plaintext server. In production the
// service must not reconnect in the clear: what it publishes never reaches that server.
// The system roots are read once per process, so the attack runs in a child process.
func TestNATSReconnectNeverDowngrades(t *testing.T) {
	if os.Getenv("OTP_TEST_DOWNGRADE_CHILD") == "1" {
		downgradeAttack(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestNATSReconnectNeverDowngrades$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "OTP_TEST_DOWNGRADE_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the attack succeeded or could not run: %v\n%s", err, out)
	}
}

func downgradeAttack(t *testing.T) {
	caFile, conf := throwawayTLS(t)
	t.Setenv("SSL_CERT_FILE", caFile) // a "public" CA: in the system roots
	secure, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, TLSConfig: conf, TLSTimeout: 5, NoLog: true, NoSigs: true})
	testenv.Must(t, err, "TLS server")
	go secure.Start()
	if !secure.ReadyForConnections(10 * time.Second) {
		t.Fatal("TLS server not ready")
	}
	port := secure.Addr().(*net.TCPAddr).Port
	c := platform.Common{NATSURL: fmt.Sprintf("nats://127.0.0.1:%d", port), Env: platform.EnvProduction}
	everythingRemote := func(string) bool { return false }
	nc, err := platform.ConnectNATSJudging(c, "test", testenv.Logger(io.Discard), everythingRemote)
	testenv.Must(t, err, "connect")
	defer nc.Close()
	if _, state := platform.NATSPeer(nc); state == nil {
		t.Fatal("the first connection is not TLS")
	}

	secure.Shutdown()
	secure.WaitForShutdown()
	plain, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: port, NoLog: true, NoSigs: true})
	testenv.Must(t, err, "plaintext server")
	go plain.Start()
	defer plain.Shutdown()
	if !plain.ReadyForConnections(10 * time.Second) {
		t.Fatal("plaintext server not ready")
	}
	observer, err := nats.Connect(plain.ClientURL())
	testenv.Must(t, err, "observer")
	defer observer.Close()
	leaked := make(chan *nats.Msg, 16) // filled by the observer's read loop, before its PONG
	_, err = observer.ChanSubscribe("otp.>", leaked)
	testenv.Must(t, err, "subscribe")
	testenv.Must(t, observer.Flush(), "flush")

	_ = nc.Publish("otp.verify.acme", []byte(`{"request_id":"r","code":"493027"}`))
	// Either the service tried the plaintext server twice and stayed away (had it
	// connected, the buffered publish would have gone out on the first try), or it
	// connected and closed itself on the second look.
	testenv.Eventually(t, 20*time.Second, "the service's reconnect attempts", func() bool {
		vz, err := plain.Varz(nil)
		return err == nil && vz.TotalConnections >= 3 || nc.IsClosed()
	})
	testenv.Must(t, observer.Flush(), "flush")
	if nc.IsConnected() || nc.IsClosed() || len(leaked) != 0 {
		t.Fatalf("reconnected in plaintext (connected=%v, closed=%v); %d messages reached the plaintext server", nc.IsConnected(), nc.IsClosed(), len(leaked))
	}
}
