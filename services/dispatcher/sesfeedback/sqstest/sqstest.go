// Package sqstest is an in-process HTTP server that speaks the SQS JSON protocol
// (awsJson1_0: POST / with X-Amz-Target AmazonSQS.<Action>) as the current
// aws-sdk-go-v2/service/sqs does: SendMessage, ReceiveMessage with long polling and
// visibility timeouts, DeleteMessage and ChangeMessageVisibility, on any number of
// queues named by the last element of their URL. A received message that is not deleted
// becomes visible again when its visibility timeout runs out, with its receive count up
// by one, as in SQS. Point the real SDK at it with BaseEndpoint.
package sqstest

import (
	"crypto/md5"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Server is the SQS endpoint.
type Server struct {
	srv *httptest.Server
	mu  sync.Mutex
	// queues by name, messages in send order.
	queues map[string][]*message
	// wake is closed and replaced when a message is sent or becomes visible.
	wake chan struct{}
	// DefaultVisibility is a queue's visibility timeout when a receive names none.
	DefaultVisibility time.Duration
	deleted           int
}

type message struct {
	id, body, receipt string
	visibleAt         time.Time
	receives          int
}

// New starts a server, stopped when the test ends.
func New(tb testing.TB) *Server {
	s := &Server{queues: map[string][]*message{}, wake: make(chan struct{}), DefaultVisibility: 30 * time.Second}
	s.srv = httptest.NewServer(http.HandlerFunc(s.handle))
	tb.Cleanup(s.srv.Close)
	return s
}

// URL is the endpoint (BaseEndpoint for the SDK).
func (s *Server) URL() string { return s.srv.URL }

// QueueURL is the URL of queue name on this server.
func (s *Server) QueueURL(name string) string { return s.srv.URL + "/123456789012/" + name }

// Send puts a message on queue name, as SNS does for a subscribed queue, and returns its id.
func (s *Server) Send(name, body string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := &message{id: newID(), body: body}
	s.queues[name] = append(s.queues[name], m)
	s.wakeLocked()
	return m.id
}

// Len is how many messages queue name holds, visible or in flight.
func (s *Server) Len(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queues[name])
}

// Receives is how many times the message id was received.
func (s *Server) Receives(name, id string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range s.queues[name] {
		if m.id == id {
			return m.receives
		}
	}
	return -1
}

// Deleted is how many messages were deleted, on every queue.
func (s *Server) Deleted() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.deleted
}

func (s *Server) wakeLocked() {
	close(s.wake)
	s.wake = make(chan struct{})
}

// apiError answers as SQS's JSON protocol does.
func apiError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.0")
	w.Header().Set("x-amzn-query-error", "AWS.SimpleQueueService."+code+";Sender")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"__type": "com.amazonaws.sqs#" + code, "message": msg})
}

func (s *Server) handle(w http.ResponseWriter, r *http.Request) {
	action, ok := strings.CutPrefix(r.Header.Get("X-Amz-Target"), "AmazonSQS.")
	if r.Method != http.MethodPost || !ok {
		apiError(w, 400, "InvalidAction", "not an SQS JSON request")
		return
	}
	var in struct {
		QueueUrl            string
		MessageBody         string
		MaxNumberOfMessages int
		WaitTimeSeconds     int
		VisibilityTimeout   *int
		ReceiptHandle       string
	}
	if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
		apiError(w, 400, "InvalidParameterValue", "body is not JSON")
		return
	}
	name := in.QueueUrl[strings.LastIndexByte(in.QueueUrl, '/')+1:]
	w.Header().Set("Content-Type", "application/x-amz-json-1.0")
	switch action {
	case "SendMessage":
		id := s.Send(name, in.MessageBody)
		sum := md5.Sum([]byte(in.MessageBody))
		_ = json.NewEncoder(w).Encode(map[string]string{"MessageId": id, "MD5OfMessageBody": hex.EncodeToString(sum[:])})
	case "ReceiveMessage":
		s.receive(w, r, name, in.MaxNumberOfMessages, in.WaitTimeSeconds, in.VisibilityTimeout)
	case "DeleteMessage", "ChangeMessageVisibility":
		s.mu.Lock()
		defer s.mu.Unlock()
		q := s.queues[name]
		for i, m := range q {
			if m.receipt == in.ReceiptHandle && in.ReceiptHandle != "" {
				if action == "DeleteMessage" {
					s.queues[name] = append(q[:i:i], q[i+1:]...)
					s.deleted++
				} else if in.VisibilityTimeout != nil {
					m.visibleAt = time.Now().Add(time.Duration(*in.VisibilityTimeout) * time.Second)
				}
				_, _ = w.Write([]byte("{}"))
				return
			}
		}
		apiError(w, 400, "ReceiptHandleIsInvalid", "The input receipt handle is invalid.")
	default:
		apiError(w, 400, "InvalidAction", "action "+action+" is not supported here")
	}
}

// receive hands out up to limit visible messages, waiting up to wait seconds for one.
func (s *Server) receive(w http.ResponseWriter, r *http.Request, name string, limit, wait int, visibility *int) {
	limit = min(max(limit, 1), 10)
	vis := s.DefaultVisibility
	if visibility != nil {
		vis = time.Duration(*visibility) * time.Second
	}
	deadline := time.Now().Add(time.Duration(wait) * time.Second)
	for {
		s.mu.Lock()
		now := time.Now()
		var out []map[string]any
		next := time.Time{}
		for _, m := range s.queues[name] {
			if len(out) == limit {
				break
			}
			if m.visibleAt.After(now) {
				if next.IsZero() || m.visibleAt.Before(next) {
					next = m.visibleAt
				}
				continue
			}
			m.receives++
			m.receipt = newID()
			m.visibleAt = now.Add(vis)
			sum := md5.Sum([]byte(m.body))
			out = append(out, map[string]any{"MessageId": m.id, "ReceiptHandle": m.receipt, "Body": m.body,
				"MD5OfBody": hex.EncodeToString(sum[:]), "Attributes": map[string]string{"ApproximateReceiveCount": strconv.Itoa(m.receives)}})
		}
		wake := s.wake
		s.mu.Unlock()
		if len(out) > 0 || !now.Before(deadline) {
			_ = json.NewEncoder(w).Encode(map[string]any{"Messages": out})
			return
		}
		timer := deadline
		if !next.IsZero() && next.Before(timer) {
			timer = next
		}
		select {
		case <-wake:
		case <-time.After(time.Until(timer)):
		case <-r.Context().Done():
			return
		}
	}
}

func newID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
