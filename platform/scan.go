package platform

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrStopScan, returned by a ScanStream callback, ends the scan without an error.
var ErrStopScan = errors.New("stop the scan")

// scanBatch is how many messages one direct get asks for.
const scanBatch = 256

// The headers the server adds to each message of a batched direct get, after the
// message's own.
var directGetHeaders = []string{jetstream.StreamHeader, jetstream.SubjectHeader, jetstream.SequenceHeader,
	jetstream.TimeStampHeaer, "Nats-Num-Pending", "Nats-Last-Sequence"}

// Scan says where ScanStream starts and what it reads.
type Scan struct {
	Filter string    // the subjects to read; every one when empty
	From   uint64    // the first sequence to read; the stream's first when 0
	Since  time.Time // when set (and From is 0), the first message stored at or after it
	// MaxBytes bounds one answer of the server (0: the server's own bound, its
	// max_pending); a batch cut short by it goes on as one cut by a replica behind.
	MaxBytes int
}

// ScanStream reads stream in order, from s.From or s.Since: the messages whose subject
// matches s.Filter, up to the stream's last sequence when the scan began. It calls fn with each; fn returning ErrStopScan ends the
// scan early. It returns the last sequence the scan covered, so a caller waiting for more
// goes on from the one after.
//
// It creates no consumer. A consumer's configuration, which subject permissions cannot
// see, names where its messages are delivered, so an identity allowed to create one
// could have a stream's messages published onto any subject of the streams' account.
// Reading needs only $JS.API.DIRECT.GET.<stream> (batched, the stream allows direct
// gets) and $JS.API.STREAM.MSG.GET.<stream>: a replica that is behind answers a direct
// get with less than the leader holds, so when a batch ends before the last sequence
// the leader is asked for the next message, and the scan goes on from it.
//
// A batched direct get appends the message's stream, subject, sequence and time as
// headers after the message's own; ScanStream takes the last of each (a message may
// carry a forged earlier one) and hands fn the message's own headers.
func ScanStream(ctx context.Context, js jetstream.JetStream, stream string, s Scan,
	fn func(*jetstream.RawStreamMsg) error) (uint64, error) {
	st, err := js.Stream(ctx, stream)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", stream, err)
	}
	end := st.CachedInfo().State.LastSeq
	filter, pos := s.Filter, max(s.From, 1)
	since := s.Since
	if s.From > 0 {
		since = time.Time{}
	}
	for pos <= end {
		n, next, err := scanBatchAt(ctx, js, stream, filter, pos, since, end, s.MaxBytes, fn)
		if err != nil {
			if errors.Is(err, ErrStopScan) {
				return end, nil
			}
			return end, err
		}
		pos = next
		if n > 0 {
			since = time.Time{} // from here on, by sequence
		}
		if n == scanBatch || pos > end {
			continue
		}
		// The batch ended early: the end of what matches, or a replica behind the
		// leader, or the byte limit of one answer. The leader knows which.
		m, err := leaderNext(ctx, js, stream, filter, pos, since)
		if err != nil {
			return end, err
		}
		if m == nil || m.Sequence > end {
			return end, nil
		}
		if err := fn(m); err != nil {
			if errors.Is(err, ErrStopScan) {
				return end, nil
			}
			return end, err
		}
		pos, since = m.Sequence+1, time.Time{}
	}
	return end, nil
}

// scanBatchAt asks for one batch from pos (from since, when set) and hands fn each
// message up to end. It returns how many messages came and the sequence after the last
// one.
func scanBatchAt(ctx context.Context, js jetstream.JetStream, stream, filter string, pos uint64, since time.Time, end uint64, maxBytes int,
	fn func(*jetstream.RawStreamMsg) error) (int, uint64, error) {
	nc := js.Conn()
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return 0, pos, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	req := map[string]any{"seq": pos, "batch": scanBatch}
	if maxBytes > 0 {
		req["max_bytes"] = maxBytes
	}
	if !since.IsZero() {
		delete(req, "seq")
		req["start_time"] = since
	}
	if filter != "" {
		req["next_by_subj"] = filter
	}
	body, _ := json.Marshal(req)
	if err := nc.PublishRequest(apiSubject(js, "DIRECT.GET."+stream), inbox, body); err != nil {
		return 0, pos, err
	}
	n := 0
	for {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		msg, err := sub.NextMsgWithContext(wctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return n, pos, fmt.Errorf("read %s from %d: %w", stream, pos, ctx.Err())
			}
			if errors.Is(err, context.DeadlineExceeded) && n == 0 {
				return 0, pos, fmt.Errorf("read %s from %d: no answer to %s (may this identity read it?)", stream, pos, apiSubject(js, "DIRECT.GET."+stream))
			}
			return n, pos, fmt.Errorf("read %s from %d: %w", stream, pos, err)
		}
		// A message of the stream always comes with the sequence header the server adds;
		// the server's own answers (end of batch, nothing found, an error) never do. A
		// stored message with an empty body and a Status header of its own is a message.
		if msg.Header.Get(jetstream.SequenceHeader) == "" {
			if len(msg.Data) != 0 || msg.Header.Get("Status") == "" {
				return n, pos, fmt.Errorf("read %s from %d: an answer that is neither a message nor a status", stream, pos)
			}
			switch msg.Header.Get("Status") {
			case "204", "404": // end of the batch; nothing (more) from pos
				return n, pos, nil
			default:
				return n, pos, fmt.Errorf("read %s from %d: %s %s", stream, pos, msg.Header.Get("Status"), msg.Header.Get("Description"))
			}
		}
		m, err := directGetMsg(msg)
		if err != nil {
			return n, pos, fmt.Errorf("read %s from %d: %w", stream, pos, err)
		}
		if st := msg.Header.Values(jetstream.StreamHeader); st[len(st)-1] != stream {
			return n, pos, fmt.Errorf("read %s from %d: an answer from stream %s", stream, pos, st[len(st)-1])
		}
		n++
		if m.Sequence < pos {
			return n, pos, fmt.Errorf("read %s from %d: sequence %d came out of order", stream, pos, m.Sequence)
		}
		if m.Sequence > end {
			return n, end + 1, nil
		}
		pos = m.Sequence + 1
		if err := fn(m); err != nil {
			return n, pos, err
		}
	}
}

// directGetMsg is the message of one answer of a batched direct get, with the message's
// own headers and the values the server appended.
func directGetMsg(msg *nats.Msg) (*jetstream.RawStreamMsg, error) {
	h := nats.Header{}
	for k, v := range msg.Header {
		h[k] = append([]string(nil), v...)
	}
	last := map[string]string{}
	for _, k := range directGetHeaders {
		vals := h[k]
		if len(vals) == 0 {
			return nil, fmt.Errorf("the answer lacks header %s", k)
		}
		last[k] = vals[len(vals)-1]
		if len(vals) == 1 {
			delete(h, k)
		} else {
			h[k] = vals[:len(vals)-1]
		}
	}
	seq, err := strconv.ParseUint(last[jetstream.SequenceHeader], 10, 64)
	if err != nil {
		return nil, fmt.Errorf("sequence %q: %w", last[jetstream.SequenceHeader], err)
	}
	at, err := time.Parse(time.RFC3339Nano, last[jetstream.TimeStampHeaer])
	if err != nil {
		return nil, fmt.Errorf("time %q: %w", last[jetstream.TimeStampHeaer], err)
	}
	if len(h) == 0 {
		h = nil
	}
	return &jetstream.RawStreamMsg{Subject: last[jetstream.SubjectHeader], Sequence: seq, Header: h, Data: msg.Data, Time: at}, nil
}

// leaderNext asks the stream's leader ($JS.API.STREAM.MSG.GET) for the first message at
// or after seq (stored at or after since, when set) on filter; nil when there is none.
func leaderNext(ctx context.Context, js jetstream.JetStream, stream, filter string, seq uint64, since time.Time) (*jetstream.RawStreamMsg, error) {
	if filter == "" {
		filter = ">"
	}
	req := map[string]any{"seq": seq, "next_by_subj": filter}
	if !since.IsZero() {
		delete(req, "seq")
		req["start_time"] = since
	}
	return leaderGet(ctx, js, stream, seq, req)
}

// GetMsg reads the message at seq of stream from the stream's leader
// ($JS.API.STREAM.MSG.GET): its answer names the message's subject, sequence and time in
// fields of its own, which a publisher cannot forge (a direct get, which
// jetstream.Stream.GetMsg makes on a stream that allows them, takes them from headers
// appended to the message's own, and nats.go reads the first: one the publisher put
// there), and is current (a replica answering a direct get may be behind, and say "not
// found"). jetstream.ErrMsgNotFound when the stream holds no message there.
func GetMsg(ctx context.Context, js jetstream.JetStream, stream string, seq uint64) (*jetstream.RawStreamMsg, error) {
	m, err := leaderGet(ctx, js, stream, seq, map[string]any{"seq": seq})
	if err == nil && m == nil {
		return nil, jetstream.ErrMsgNotFound
	}
	return m, err
}

// leaderGet asks the stream's leader for the message req names; nil when there is none.
func leaderGet(ctx context.Context, js jetstream.JetStream, stream string, seq uint64, req map[string]any) (*jetstream.RawStreamMsg, error) {
	body, _ := json.Marshal(req)
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	msg, err := js.Conn().RequestWithContext(rctx, apiSubject(js, "STREAM.MSG.GET."+stream), body)
	if err != nil {
		return nil, fmt.Errorf("read %s at %d: %w", stream, seq, err)
	}
	var resp struct {
		Error *jetstream.APIError `json:"error"`
		Msg   *struct {
			Subject string    `json:"subject"`
			Seq     uint64    `json:"seq"`
			Header  []byte    `json:"hdrs"`
			Data    []byte    `json:"data"`
			Time    time.Time `json:"time"`
		} `json:"message"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return nil, fmt.Errorf("read %s at %d: %w", stream, seq, err)
	}
	if resp.Error != nil {
		if resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound {
			return nil, nil
		}
		return nil, fmt.Errorf("read %s at %d: %w", stream, seq, resp.Error)
	}
	if resp.Msg == nil {
		return nil, fmt.Errorf("read %s at %d: an answer without a message", stream, seq)
	}
	m := &jetstream.RawStreamMsg{Subject: resp.Msg.Subject, Sequence: resp.Msg.Seq, Data: resp.Msg.Data, Time: resp.Msg.Time}
	if len(resp.Msg.Header) > 0 {
		h, err := nats.DecodeHeadersMsg(resp.Msg.Header)
		if err != nil {
			return nil, fmt.Errorf("read %s at %d: headers: %w", stream, seq, err)
		}
		m.Header = h
	}
	return m, nil
}

// apiSubject is the JetStream API subject suffix (such as "DIRECT.GET.S") under js's
// prefix.
func apiSubject(js jetstream.JetStream, suffix string) string {
	p := js.Options().APIPrefix
	if p == "" {
		p = jetstream.DefaultAPIPrefix
	}
	if !strings.HasSuffix(p, ".") {
		p += "."
	}
	return p + suffix
}
