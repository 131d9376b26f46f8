package testenv

import (
	"context"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Proxy is a TCP proxy on a loopback port to a server. Cut is an outage of that server
// for whoever connects through the proxy, and only for them: every connection through it
// is closed and new ones are closed as soon as they are accepted, while the shared server
// goes on; Restore ends it.
type Proxy struct {
	Addr   string
	target string
	ln     net.Listener

	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]bool
}

// NewProxy starts a proxy to target (host:port), stopped at cleanup.
func NewProxy(tb testing.TB, target string) *Proxy {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	Must(tb, err, "proxy listen")
	p := &Proxy{Addr: ln.Addr().String(), target: target, ln: ln, conns: map[net.Conn]bool{}}
	go p.serve()
	tb.Cleanup(func() {
		_ = ln.Close()
		p.Cut()
	})
	return p
}

// Cut closes every connection through the proxy and refuses new ones until Restore.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = true
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
}

// Restore lets connections through again.
func (p *Proxy) Restore() {
	p.mu.Lock()
	p.cut = false
	p.mu.Unlock()
}

func (p *Proxy) serve() {
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.pipe(in)
	}
}

// pipe joins in to a new connection to the target, both tracked so that Cut closes them.
func (p *Proxy) pipe(in net.Conn) {
	if !p.track(in) {
		_ = in.Close()
		return
	}
	out, err := net.Dial("tcp", p.target)
	if err != nil || !p.track(out) {
		_ = in.Close()
		if out != nil {
			_ = out.Close()
		}
		return
	}
	copyThenClose := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		_ = dst.Close()
		_ = src.Close()
		p.mu.Lock()
		delete(p.conns, dst)
		delete(p.conns, src)
		p.mu.Unlock()
	}
	go copyThenClose(out, in)
	copyThenClose(in, out)
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cut {
		return false
	}
	p.conns[c] = true
	return true
}

// PostgresProxy returns a pool like pool (same database, role and settings) that reaches
// its server through a new Proxy, both closed at cleanup: cutting the proxy is a database
// outage for that pool alone.
func PostgresProxy(tb testing.TB, pool *pgxpool.Pool) (*pgxpool.Pool, *Proxy) {
	tb.Helper()
	cfg := pool.Config()
	p := NewProxy(tb, net.JoinHostPort(cfg.ConnConfig.Host, strconv.Itoa(int(cfg.ConnConfig.Port))))
	host, port, err := net.SplitHostPort(p.Addr)
	Must(tb, err, "proxy address")
	n, err := strconv.ParseUint(port, 10, 16)
	Must(tb, err, "proxy port")
	cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Fallbacks = host, uint16(n), nil
	via, err := pgxpool.NewWithConfig(context.Background(), cfg)
	Must(tb, err, "pool through the proxy")
	tb.Cleanup(via.Close)
	Must(tb, via.Ping(context.Background()), "ping through the proxy")
	return via, p
}
