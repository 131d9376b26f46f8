package chaos

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// NATSServer is a nats-server process with JetStream on file storage, alone or one node
// of a cluster. Killed and started again it keeps its store, its ports and its name.
type NATSServer struct {
	Name string
	Port int
	*Process
}

// URL is the server's client URL.
func (s *NATSServer) URL() string { return fmt.Sprintf("nats://127.0.0.1:%d", s.Port) }

// StartNATS writes the configuration of n servers under dir (n > 1: one cluster, routed
// to each other) and starts them. Call WaitJetStream before use.
func StartNATS(bins Bins, dir string, n int) ([]*NATSServer, error) {
	ports, err := freePorts(2 * n)
	if err != nil {
		return nil, err
	}
	routes := make([]string, n)
	for i := range n {
		routes[i] = fmt.Sprintf("%q", fmt.Sprintf("nats://127.0.0.1:%d", ports[n+i]))
	}
	servers := make([]*NATSServer, n)
	for i := range n {
		name := fmt.Sprintf("n%d", i+1)
		conf := fmt.Sprintf("server_name: %q\nlisten: \"127.0.0.1:%d\"\n"+
			"jetstream {\n  store_dir: %q\n  max_memory_store: 256MB\n  max_file_store: 8GB\n}\n",
			name, ports[i], filepath.Join(dir, name, "store"))
		if n > 1 {
			conf += fmt.Sprintf("cluster {\n  name: \"otp\"\n  listen: \"127.0.0.1:%d\"\n  routes: [%s]\n}\n",
				ports[n+i], strings.Join(routes, ", "))
		}
		file := filepath.Join(dir, name+".conf")
		if err := os.MkdirAll(filepath.Join(dir, name), 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(file, []byte(conf), 0o644); err != nil {
			return nil, err
		}
		s := &NATSServer{Name: name, Port: ports[i],
			Process: NewProcess("nats-"+name, bins.Path("nats-server"), []string{"-c", file}, nil, filepath.Join(dir, name+".log"))}
		if err := s.Start(); err != nil {
			return nil, err
		}
		servers[i] = s
	}
	return servers, nil
}

// URLs is the comma-separated client URLs of servers, as OTP_NATS_URL takes them.
func URLs(servers []*NATSServer) string {
	urls := make([]string, len(servers))
	for i, s := range servers {
		urls[i] = s.URL()
	}
	return strings.Join(urls, ",")
}

// WaitJetStream waits until JetStream answers at url (in a cluster: a meta leader exists).
func WaitJetStream(url string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		last = func() error {
			nc, err := nats.Connect(url, nats.Timeout(time.Second))
			if err != nil {
				return err
			}
			defer nc.Close()
			js, err := jetstream.New(nc)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_, err = js.AccountInfo(ctx)
			return err
		}()
		if last == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("JetStream at %s not ready within %v: %w", url, timeout, last)
}

// StreamLeader is the name of the server that leads stream.
func StreamLeader(js jetstream.JetStream, stream string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, stream)
	if err != nil {
		return "", err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return "", err
	}
	if info.Cluster == nil || info.Cluster.Leader == "" {
		return "", errors.New("no leader")
	}
	return info.Cluster.Leader, nil
}

// StreamsCurrent reports whether each of streams has a leader and replicas current
// replicas besides it.
func StreamsCurrent(js jetstream.JetStream, replicas int, streams ...string) error {
	for _, name := range streams {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := js.Stream(ctx, name)
		if err == nil {
			var info *jetstream.StreamInfo
			info, err = st.Info(ctx)
			if err == nil {
				current := 0
				if info.Cluster != nil && info.Cluster.Leader != "" {
					current = 1
					for _, r := range info.Cluster.Replicas {
						if r.Current && !r.Offline {
							current++
						}
					}
				}
				if current < replicas {
					err = fmt.Errorf("%d of %d replicas current", current, replicas)
				}
			}
		}
		cancel()
		if err != nil {
			return fmt.Errorf("stream %s: %w", name, err)
		}
	}
	return nil
}

// freePorts returns n distinct free loopback ports.
func freePorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	ports := make([]int, n)
	for i := range ports {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		ports[i] = ln.Addr().(*net.TCPAddr).Port
	}
	return ports, nil
}
