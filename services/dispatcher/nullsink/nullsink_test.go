package nullsink_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/nullsink"
)

// TestHandsEachMessageToTheCollector: every accepted message reaches the collector as
// one line with its id and text; with no collector listening the provider is down, so
// the dispatcher fails over as it would from a dead mail server.
func TestHandsEachMessageToTheCollector(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan nullsink.Handed, 10)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		sc := bufio.NewScanner(conn)
		for sc.Scan() {
			var h nullsink.Handed
			if err := json.Unmarshal(sc.Bytes(), &h); err != nil {
				t.Errorf("line %q: %v", sc.Text(), err)
			}
			got <- h
		}
	}()
	p := nullsink.New(nullsink.Config{Addr: ln.Addr().String()})
	defer p.Close()
	for _, id := range []string{"c1:1", "c2:1"} {
		r, err := p.Send(context.Background(), &mailer.Message{ID: id, To: "ana@example.com", Text: "Your code is 123456"})
		if err != nil || r.MessageID == "" {
			t.Fatalf("send %s: %v %+v", id, err, r)
		}
		h := <-got
		if h.ID != id || h.Text != "Your code is 123456" || h.To != "ana@example.com" || h.MessageID != r.MessageID {
			t.Errorf("handed %+v for %s", h, id)
		}
	}

	ln.Close()
	p.Close()
	_, err = p.Send(context.Background(), &mailer.Message{ID: "c3:1", Text: "x"})
	var se *mailer.SendError
	if !errors.As(err, &se) || se.Class != mailer.ProviderDown {
		t.Fatalf("collector gone: %v, want a provider_down SendError", err)
	}
}

// TestTakesItsDelay: a send waits the configured delay, and gives up when its context does.
func TestTakesItsDelay(t *testing.T) {
	p := nullsink.New(nullsink.Config{Delay: 50 * time.Millisecond})
	start := time.Now()
	if _, err := p.Send(context.Background(), &mailer.Message{ID: "c:1"}); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < 50*time.Millisecond {
		t.Errorf("send took %v, want at least the 50ms delay", took)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := p.Send(ctx, &mailer.Message{ID: "c:2"})
	var se *mailer.SendError
	if !errors.As(err, &se) || se.Class != mailer.Transient {
		t.Errorf("cancelled send: %v, want a transient SendError", err)
	}
}
