package platform_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestScanStream reads a stream in order by batched direct gets: every message once, in
// sequence order, across several batches; from a sequence or a time; by subject; up to
// the last message at the start even while more arrive; stopping when asked; and each
// message with its own headers and its real subject, sequence and time even when it
// carries forged ones of the names the server adds, or looks like a status of the
// server (an empty body with a Status header).
func TestScanStream(t *testing.T) {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "SCAN", Subjects: []string{"scan.*"}, AllowDirect: true})
	testenv.Must(t, err, "stream")
	const n = 700 // more than two batches
	var midTime time.Time
	for i := 1; i <= n; i++ {
		subj := "scan.a"
		if i%3 == 0 {
			subj = "scan.b"
		}
		m := &nats.Msg{Subject: subj, Data: fmt.Appendf(nil, "m%d", i), Header: nats.Header{"Own": []string{fmt.Sprint(i)}}}
		if i == 5 {
			// A publisher's forgery of what the server appends.
			m.Header.Set(jetstream.SequenceHeader, "1")
			m.Header.Set(jetstream.SubjectHeader, "scan.z")
			m.Header.Set(jetstream.TimeStampHeaer, "2001-01-01T00:00:00Z")
		}
		if i == 6 {
			// A message that looks like a status of the server: empty, with Status.
			m.Data = nil
			m.Header.Set("Status", "500")
			m.Header.Set("Description", "forged")
		}
		ack, err := js.PublishMsg(ctx, m)
		testenv.Must(t, err, "publish")
		if i == 400 {
			st, err := js.Stream(ctx, "SCAN")
			testenv.Must(t, err, "stream")
			got, err := st.GetMsg(ctx, ack.Sequence)
			testenv.Must(t, err, "message 400")
			midTime = got.Time
		}
	}

	scan := func(s platform.Scan, stopAt uint64) ([]*jetstream.RawStreamMsg, uint64) {
		t.Helper()
		var got []*jetstream.RawStreamMsg
		last, err := platform.ScanStream(ctx, js, "SCAN", s, func(m *jetstream.RawStreamMsg) error {
			got = append(got, m)
			if m.Sequence == stopAt {
				return platform.ErrStopScan
			}
			return nil
		})
		testenv.Must(t, err, "scan %+v", s)
		return got, last
	}

	all, last := scan(platform.Scan{}, 0)
	if len(all) != n || last != n {
		t.Fatalf("read %d messages up to %d, want %d", len(all), last, n)
	}
	for i, m := range all {
		want := uint64(i + 1)
		data := fmt.Sprintf("m%d", want)
		if want == 6 {
			data = ""
		}
		if m.Sequence != want || string(m.Data) != data || m.Header.Get("Own") != fmt.Sprint(want) || m.Time.IsZero() {
			t.Fatalf("message %d: seq %d data %q header %v time %v", want, m.Sequence, m.Data, m.Header, m.Time)
		}
		if want != 5 && want != 6 && (len(m.Header) != 1 || m.Header.Get("Nats-Num-Pending") != "") {
			t.Fatalf("message %d carries the server's headers: %v", want, m.Header)
		}
	}
	forged := all[4]
	if forged.Subject != "scan.a" || forged.Sequence != 5 || forged.Time.Year() < 2020 ||
		forged.Header.Get(jetstream.SequenceHeader) != "1" || forged.Header.Get(jetstream.SubjectHeader) != "scan.z" {
		t.Fatalf("message 5 with forged headers read as %s seq %d at %v, headers %v", forged.Subject, forged.Sequence, forged.Time, forged.Header)
	}

	if st := all[5]; st.Header.Get("Status") != "500" || len(st.Data) != 0 {
		t.Fatalf("the message that looks like a status read as %v %q", st.Header, st.Data)
	}

	bs, _ := scan(platform.Scan{Filter: "scan.b", From: 100}, 0)
	if len(bs) != (n/3)-33 || bs[0].Sequence != 102 || bs[len(bs)-1].Sequence != 699 {
		t.Fatalf("scan.b from 100: %d messages, %d..%d", len(bs), bs[0].Sequence, bs[len(bs)-1].Sequence)
	}
	for _, m := range bs {
		if m.Subject != "scan.b" {
			t.Fatalf("filtered scan read %s", m.Subject)
		}
	}
	since, _ := scan(platform.Scan{Since: midTime}, 0)
	if len(since) == 0 || since[0].Sequence > 400 || since[len(since)-1].Sequence != n {
		t.Fatalf("since message 400's time: %d messages from %d", len(since), since[0].Sequence)
	}
	stopped, _ := scan(platform.Scan{From: 10}, 300)
	if len(stopped) != 291 || stopped[len(stopped)-1].Sequence != 300 {
		t.Fatalf("stopped at 300: %d messages", len(stopped))
	}
	none, last := scan(platform.Scan{Filter: "scan.none"}, 0)
	if len(none) != 0 || last != n {
		t.Fatalf("nothing on scan.none: %d messages, last %d", len(none), last)
	}

	// Messages that arrive during the scan are the next scan's.
	grown := 0
	_, err = platform.ScanStream(ctx, js, "SCAN", platform.Scan{From: n - 1}, func(m *jetstream.RawStreamMsg) error {
		grown++
		if m.Sequence > n {
			return fmt.Errorf("read %d, past the end at the start", m.Sequence)
		}
		_, err := js.Publish(ctx, "scan.a", []byte("late"))
		return err
	})
	testenv.Must(t, err, "scan while publishing")
	if grown != 2 {
		t.Fatalf("read %d messages from %d, want 2", grown, n-1)
	}

	// Deleted messages are skipped.
	st, err := js.Stream(ctx, "SCAN")
	testenv.Must(t, err, "stream")
	for _, seq := range []uint64{2, 3, 256, 257} {
		testenv.Must(t, st.DeleteMsg(ctx, seq), "delete %d", seq)
	}
	after, _ := scan(platform.Scan{}, 300)
	for _, m := range after {
		if m.Sequence == 2 || m.Sequence == 3 || m.Sequence == 256 || m.Sequence == 257 {
			t.Fatalf("read deleted message %d", m.Sequence)
		}
	}
	if len(after) != 296 {
		t.Fatalf("read %d messages up to 300 with 4 deleted, want 296", len(after))
	}

	// A stream without direct gets: a clear error, not a silent empty read.
	_, err = js.CreateStream(ctx, jetstream.StreamConfig{Name: "NODIRECT", Subjects: []string{"nodirect"}})
	testenv.Must(t, err, "stream")
	_, err = js.Publish(ctx, "nodirect", []byte("x"))
	testenv.Must(t, err, "publish")
	_, err = platform.ScanStream(ctx, js, "NODIRECT", platform.Scan{}, func(*jetstream.RawStreamMsg) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "NODIRECT") {
		t.Fatalf("scan of a stream without direct gets: %v", err)
	}
	if errors.Is(err, platform.ErrStopScan) {
		t.Fatal("stop is not an error")
	}
}

// TestScanStreamGoesOnWhereABatchEndsEarly: a direct get answers less than it was asked
// for when a replica is behind the leader or when the answer reaches the server's byte
// limit. The scan then asks the leader for the next message and goes on; here a byte
// limit that cuts every batch short stands in for both.
func TestScanStreamGoesOnWhereABatchEndsEarly(t *testing.T) {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "SCAN", Subjects: []string{"scan"}, AllowDirect: true})
	testenv.Must(t, err, "stream")
	body := []byte(strings.Repeat("x", 1000)) // four to a batch
	for range 50 {
		_, err := js.Publish(ctx, "scan", body)
		testenv.Must(t, err, "publish")
	}
	var seqs []uint64
	_, err = platform.ScanStream(ctx, js, "SCAN", platform.Scan{MaxBytes: 4000}, func(m *jetstream.RawStreamMsg) error {
		seqs = append(seqs, m.Sequence)
		return nil
	})
	testenv.Must(t, err, "scan")
	if len(seqs) != 50 || seqs[0] != 1 || seqs[49] != 50 {
		t.Fatalf("read %d messages (%v), want 1..50", len(seqs), seqs)
	}
	for i := range seqs {
		if seqs[i] != uint64(i+1) {
			t.Fatalf("out of order or twice: %v", seqs)
		}
	}
}
