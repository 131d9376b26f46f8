package chaos

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// Proxy is a TCP relay on a fixed loopback port in front of a mail provider, so the
// provider can fail the way a real one does on the wire: Down closes the port
// (connections are refused, open ones cut), Up opens it again, Hang passes every request
// on but withholds every answer, so the provider acts on a send whose caller never learns
// the outcome, and Delay makes every answer late.
type Proxy struct {
	Addr string

	target string
	mu     sync.Mutex
	ln     net.Listener
	conns  map[net.Conn]bool
	hang   bool
	delay  time.Duration
}

// NewProxy relays a free loopback port to target and closes at cleanup.
func NewProxy(tb testing.TB, target string) *Proxy {
	tb.Helper()
	p := &Proxy{target: target, conns: map[net.Conn]bool{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	p.Addr = ln.Addr().String()
	p.serve(ln)
	tb.Cleanup(p.Down)
	return p
}

// Down closes the port and every open connection.
func (p *Proxy) Down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// Up opens the port again.
func (p *Proxy) Up() error {
	ln, err := net.Listen("tcp", p.Addr)
	if err != nil {
		return err
	}
	p.serve(ln)
	return nil
}

// Hang turns withholding the answers on or off.
func (p *Proxy) Hang(on bool) {
	p.mu.Lock()
	p.hang = on
	p.mu.Unlock()
}

// Delay holds back each answer by d on its way back: the provider has acted on the
// request for d before its caller can know it.
func (p *Proxy) Delay(d time.Duration) {
	p.mu.Lock()
	p.delay = d
	p.mu.Unlock()
}

func (p *Proxy) answering() (hang bool, delay time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hang, p.delay
}

func (p *Proxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.relay(c)
		}
	}()
}

func (p *Proxy) track(c net.Conn, on bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if on {
		if p.ln == nil {
			return false
		}
		p.conns[c] = true
	} else {
		delete(p.conns, c)
	}
	return true
}

func (p *Proxy) relay(client net.Conn) {
	defer client.Close()
	upstream, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer upstream.Close()
	if !p.track(client, true) || !p.track(upstream, true) {
		return
	}
	defer p.track(client, false)
	defer p.track(upstream, false)
	done := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(upstream, client)
		done <- struct{}{}
	}()
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := upstream.Read(buf)
			hang, delay := p.answering()
			if n > 0 && !hang {
				time.Sleep(delay) // the fault: an answer late by delay
				if _, werr := client.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		done <- struct{}{}
	}()
	<-done // either side closing ends the relay
}
