package testenv

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// Cluster starts n embedded NATS servers routed into one JetStream cluster, waits for
// its meta leader and for every node to be a current peer of it, and shuts them down at
// cleanup. Streams on it can have n replicas.
func Cluster(tb testing.TB, n int) []*server.Server {
	tb.Helper()
	ports := make([]int, n)
	routes := make([]string, n)
	for i := range ports {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		ports[i] = ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		routes[i] = fmt.Sprintf("nats://127.0.0.1:%d", ports[i])
	}
	servers := make([]*server.Server, n)
	for i := range servers {
		opts := &server.Options{
			ServerName: fmt.Sprintf("n%d", i+1), Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: tb.TempDir(),
			NoLog: true, NoSigs: true, JetStreamMaxMemory: 64 << 20, JetStreamMaxStore: 1 << 30,
			Cluster: server.ClusterOpts{Name: "otp", Host: "127.0.0.1", Port: ports[i]},
			Routes:  server.RoutesFromStr(strings.Join(routes, ",")),
		}
		s, err := server.NewServer(opts)
		if err != nil {
			tb.Fatalf("nats server %d: %v", i+1, err)
		}
		go s.Start()
		servers[i] = s
		tb.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	}
	for _, s := range servers {
		if !s.ReadyForConnections(10 * time.Second) {
			tb.Fatal("nats cluster node not ready")
		}
	}
	nc, err := nats.Connect(servers[0].ClientURL())
	Must(tb, err, "connect")
	defer nc.Close()
	js, err := jetstream.New(nc)
	Must(tb, err, "jetstream")
	Eventually(tb, 30*time.Second, "a JetStream meta leader", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := js.AccountInfo(ctx)
		return err == nil
	})
	// Placement of an R<n> stream needs every peer online, with JetStream, and its
	// statistics received by the meta leader; a leader alone is not enough.
	Eventually(tb, 30*time.Second, "every node a current JetStream peer", func() bool {
		for _, s := range servers {
			if !s.JetStreamIsCurrent() {
				return false
			}
		}
		for _, s := range servers {
			if s.JetStreamIsLeader() {
				return len(s.JetStreamClusterPeers()) == n
			}
		}
		return false
	})
	return servers
}

// JetStreamReplicas is JetStream with the contract's streams (with replicas) and durable
// consumers provisioned, as otpflow provision makes them.
func JetStreamReplicas(tb testing.TB, s *server.Server, replicas int) (*nats.Conn, jetstream.JetStream) {
	tb.Helper()
	nc, err := nats.Connect(s.ClientURL())
	Must(tb, err, "connect to NATS")
	tb.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	Must(tb, err, "jetstream")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = platform.Provision(ctx, js, events.StreamOptions{Replicas: replicas})
	Must(tb, err, "provision streams and consumers")
	return nc, js
}
