// Package sestest is an in-process HTTP server that speaks the SES v2 wire format
// (restJson1: POST /v2/email/outbound-emails, GET /v2/email/account) and can be told to
// fail: error answers such as TooManyRequestsException or 503, slow answers, reset
// connections. Point the real SDK at it with OTP_SES_ENDPOINT / ses.Config.Endpoint.
package sestest

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Email is one SendEmail request the server accepted, as the SDK sent it.
type Email struct {
	MessageID string
	From      string
	To        []string
	Subject   string
	Text      string
	HTML      string
	Headers   map[string]string
	Tags      map[string]string
	ConfigSet string
}

// Fault is what the server does with one SendEmail call. The zero Fault accepts it.
type Fault struct {
	Status  int    // an error answer with this HTTP status
	Code    string // X-Amzn-ErrorType, e.g. TooManyRequestsException
	Message string
	Delay   time.Duration // wait before answering (the answer still follows)
	Reset   bool          // read the request, then drop the connection without an answer
	// AcceptThenReset stores the mail, then drops the connection: the ambiguous case.
	AcceptThenReset bool
}

// Errors SES v2 answers, ready to use as faults.
var (
	Throttled     = Fault{Status: 429, Code: "TooManyRequestsException", Message: "Maximum sending rate exceeded."}
	Unavailable   = Fault{Status: 503, Code: "ServiceUnavailable", Message: "Service Unavailable"}
	InternalError = Fault{Status: 500, Code: "InternalServiceErrorException", Message: "Internal error"}
	Rejected      = Fault{Status: 400, Code: "MessageRejected", Message: "Email address is blacklisted."}
	Unverified    = Fault{Status: 400, Code: "MessageRejected", Message: "Email address is not verified. The following identities failed the check: x@y.z"}
	BadRequest    = Fault{Status: 400, Code: "BadRequestException", Message: "Missing required parameter"}
	Paused        = Fault{Status: 400, Code: "SendingPausedException", Message: "Sending is paused for this account."}
	Suspended     = Fault{Status: 400, Code: "AccountSuspendedException", Message: "Account suspended."}
	MailFrom      = Fault{Status: 400, Code: "MailFromDomainNotVerifiedException", Message: "MAIL FROM domain is not verified."}
	NotFound      = Fault{Status: 404, Code: "NotFoundException", Message: "Configuration set does not exist."}
	LimitExceeded = Fault{Status: 400, Code: "LimitExceededException", Message: "Too many instances."}
	DailyQuota    = Fault{Status: 400, Code: "Throttling", Message: "Daily message quota exceeded."}
	Denied        = Fault{Status: 403, Code: "AccessDeniedException", Message: "User is not authorized."}
)

// NotVerified answers as the SES sandbox does to a recipient that is not a verified
// identity: MessageRejected, naming the recipients. Use it as a fault function.
func NotVerified(_ int64, e Email) Fault {
	return Fault{Status: 400, Code: "MessageRejected", Message: "Email address is not verified. " +
		"The following identities failed the check in region EU-WEST-1: " + strings.Join(e.To, ", ")}
}

// Server is the fake SES v2 endpoint.
type Server struct {
	URL string

	srv      *httptest.Server
	mu       sync.Mutex
	emails   []Email
	fault    func(n int64, e Email) Fault
	calls    atomic.Int64
	sendRate float64
}

// New starts a server on a loopback port and closes it at cleanup.
func New(tb interface{ Cleanup(func()) }) *Server {
	s := &Server{sendRate: 14}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v2/email/outbound-emails", s.sendEmail)
	mux.HandleFunc("GET /v2/email/account", s.getAccount)
	s.srv = httptest.NewServer(mux)
	s.URL = s.srv.URL
	tb.Cleanup(s.srv.Close)
	return s
}

// SetFault decides the fault of every following call; n counts calls from 1. Nil accepts all.
func (s *Server) SetFault(f func(n int64, e Email) Fault) {
	s.mu.Lock()
	s.fault = f
	s.mu.Unlock()
}

// Always returns a fault function that answers f to every call.
func Always(f Fault) func(int64, Email) Fault { return func(int64, Email) Fault { return f } }

// SetSendRate sets the MaxSendRate that GetAccount reports.
func (s *Server) SetSendRate(r float64) { s.mu.Lock(); s.sendRate = r; s.mu.Unlock() }

// Emails returns the accepted mails.
func (s *Server) Emails() []Email {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Email(nil), s.emails...)
}

// Calls is the number of SendEmail calls received, accepted or not.
func (s *Server) Calls() int64 { return s.calls.Load() }

type content struct {
	Data string `json:"Data"`
}

type sendEmailRequest struct {
	FromEmailAddress string `json:"FromEmailAddress"`
	Destination      struct {
		ToAddresses []string `json:"ToAddresses"`
	} `json:"Destination"`
	Content struct {
		Simple *struct {
			Subject content `json:"Subject"`
			Body    struct {
				Text *content `json:"Text"`
				Html *content `json:"Html"`
			} `json:"Body"`
			Headers []struct{ Name, Value string } `json:"Headers"`
		} `json:"Simple"`
	} `json:"Content"`
	EmailTags            []struct{ Name, Value string } `json:"EmailTags"`
	ConfigurationSetName string                         `json:"ConfigurationSetName"`
}

func (s *Server) sendEmail(w http.ResponseWriter, r *http.Request) {
	n := s.calls.Add(1)
	body, _ := io.ReadAll(r.Body)
	var req sendEmailRequest
	if err := json.Unmarshal(body, &req); err != nil || req.Content.Simple == nil {
		writeError(w, BadRequest)
		return
	}
	e := Email{From: req.FromEmailAddress, To: req.Destination.ToAddresses, Subject: req.Content.Simple.Subject.Data,
		Headers: map[string]string{}, Tags: map[string]string{}, ConfigSet: req.ConfigurationSetName}
	if t := req.Content.Simple.Body.Text; t != nil {
		e.Text = t.Data
	}
	if h := req.Content.Simple.Body.Html; h != nil {
		e.HTML = h.Data
	}
	for _, h := range req.Content.Simple.Headers {
		e.Headers[h.Name] = h.Value
	}
	for _, t := range req.EmailTags {
		e.Tags[t.Name] = t.Value
	}
	s.mu.Lock()
	faultFn := s.fault
	s.mu.Unlock()
	var f Fault
	if faultFn != nil {
		f = faultFn(n, e)
	}
	if f.Delay > 0 {
		select {
		case <-time.After(f.Delay):
		case <-r.Context().Done():
			return
		}
	}
	if f.Reset || f.AcceptThenReset {
		if f.AcceptThenReset {
			s.store(&e, n)
		}
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				conn.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	if f.Status != 0 {
		writeError(w, f)
		return
	}
	s.store(&e, n)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]string{"MessageId": e.MessageID})
}

func (s *Server) store(e *Email, n int64) {
	e.MessageID = fmt.Sprintf("0100-fake-%06d", n)
	s.mu.Lock()
	s.emails = append(s.emails, *e)
	s.mu.Unlock()
}

func writeError(w http.ResponseWriter, f Fault) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Amzn-ErrorType", f.Code)
	w.WriteHeader(f.Status)
	_ = json.NewEncoder(w).Encode(map[string]string{"message": f.Message})
}

func (s *Server) getAccount(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	rate := s.sendRate
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"SendingEnabled":          true,
		"ProductionAccessEnabled": true,
		"SendQuota":               map[string]float64{"Max24HourSend": 50000, "MaxSendRate": rate, "SentLast24Hours": 0},
	})
}
