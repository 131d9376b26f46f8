package sesfeedback

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"time"
)

// The window of an SNS Timestamp the Verifier takes. SNS retries a delivery to SQS and
// SQS keeps a message up to 14 days, so a notification can be that old when it is read;
// anything older is a replay. The skew allows for the clocks of SNS and this host.
const (
	MaxAge  = 14 * 24 * time.Hour
	MaxSkew = 5 * time.Minute
)

// maxCertSize bounds a signing certificate's PEM (SNS's are about 2 KiB), maxCerts the
// certificates a Verifier keeps, and certTimeout a fetch of one.
const (
	maxCertSize = 64 << 10
	maxCerts    = 32
	certTimeout = 10 * time.Second
)

// FetchFunc returns the PEM at a signing certificate URL, which the Verifier has checked
// is https://sns.<region>.amazonaws.com[.cn]/….pem. An error wrapping ErrNoCert says the
// URL holds no certificate (the notification is refused); any other is a failure to reach
// it (the notification is tried again).
type FetchFunc func(ctx context.Context, url string) ([]byte, error)

// ErrNoCert is a signing certificate URL that answered, but with no certificate: a 4xx,
// a body too big, a redirect elsewhere.
var ErrNoCert = errors.New("no signing certificate at the URL")

// Verifier checks that a queue message is an SNS notification that Amazon SNS signed, for
// one topic, within MaxAge, as AWS documents ("Verifying the signatures of Amazon SNS
// messages"): SignatureVersion 1 (SHA1withRSA) or 2 (SHA256withRSA) over the string to
// sign, with the certificate at SigningCertURL, which must be SNS's own host and valid
// at the notification's Timestamp. SNS signs the messages of every topic of a region,
// anyone's, with the same certificate, so the topic check is what keeps out a
// notification someone published to a topic of their own. The tags' MAC (keys.Subjects.VerifyTagMAC) ties a notification
// to a mail; the signature is what ties its event type, times and id to SES.
//
// The certificate is trusted because it came over TLS from SNS's host (FetchFunc); it is
// fetched once per URL and kept. A Verifier is safe for concurrent use.
type Verifier struct {
	topic string
	fetch FetchFunc

	mu    sync.Mutex
	certs map[string]*x509.Certificate
}

var topicARN = regexp.MustCompile(`^arn:aws(-[a-z]+)*:sns:[a-z]{2}(-[a-z]+)+-[0-9]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}$`)

// NewVerifier checks notifications of the topic topicARN (OTP_SES_FEEDBACK_TOPIC_ARN),
// fetching certificates with fetch (HTTPSFetch in production).
func NewVerifier(topicARN string, fetch FetchFunc) (*Verifier, error) {
	if !validTopicARN(topicARN) {
		return nil, errors.New("not the ARN of an SNS topic, arn:aws:sns:<region>:<account>:<name>")
	}
	if fetch == nil {
		return nil, errors.New("no certificate fetch")
	}
	return &Verifier{topic: topicARN, fetch: fetch, certs: map[string]*x509.Certificate{}}, nil
}

func validTopicARN(s string) bool { return topicARN.MatchString(s) }

// certHost is SNS's host in a region, the only one a signing certificate comes from.
var certHost = regexp.MustCompile(`^sns\.[a-z]{2}(-[a-z]+)+-[0-9]+\.amazonaws\.com(\.cn)?$`)

// Verify reports whether body, a queue message, is an SNS notification of the topic that
// SNS signed and that is not older than MaxAge at now. It returns nil or an *Error with
// one of the Reasons (ReasonUnsigned for a raw SES record: raw message delivery carries
// no signature), or another error when the certificate could not be fetched, which is
// worth trying again. A refusal's detail quotes nothing of the body.
func (v *Verifier) Verify(ctx context.Context, body []byte, now time.Time) error {
	env, err := decodeEnvelope(body)
	if err != nil {
		return err
	}
	switch {
	case env.Type == "":
		return &Error{ReasonUnsigned, "not an SNS envelope (raw message delivery?): nothing signed it"}
	case env.Type != "Notification":
		return &Error{ReasonNotEvent, "SNS message of type " + quoteToken(env.Type)}
	case env.TopicArn != v.topic:
		return &Error{ReasonWrongTopic, "TopicArn is not the configured topic"}
	case env.Signature == "" || env.SignatureVersion == "" || env.SigningCertURL == "":
		return &Error{ReasonUnsigned, "SNS notification without Signature, SignatureVersion or SigningCertURL"}
	case env.MessageID == "" || env.Message == "":
		return &Error{ReasonMissingField, "SNS notification without MessageId or Message"}
	}
	at, err := time.Parse(time.RFC3339Nano, env.Timestamp)
	switch {
	case err != nil:
		return &Error{ReasonMissingField, "SNS Timestamp is not an RFC 3339 time"}
	case now.Sub(at) > MaxAge:
		return &Error{ReasonStale, fmt.Sprintf("SNS Timestamp more than %s old", MaxAge)}
	case at.Sub(now) > MaxSkew:
		return &Error{ReasonStale, fmt.Sprintf("SNS Timestamp more than %s ahead of the clock", MaxSkew)}
	}
	var hash crypto.Hash
	switch env.SignatureVersion {
	case "1":
		hash = crypto.SHA1
	case "2":
		hash = crypto.SHA256
	default:
		return &Error{ReasonBadSignature, "SignatureVersion is neither 1 nor 2"}
	}
	sig, err := base64.StdEncoding.DecodeString(env.Signature)
	if err != nil {
		return &Error{ReasonBadSignature, "Signature is not base64"}
	}
	certURL, ok := snsCertURL(env.SigningCertURL)
	if !ok {
		return &Error{ReasonBadSignature, "SigningCertURL is not https://sns.<region>.amazonaws.com/<name>.pem"}
	}
	cert, err := v.cert(ctx, certURL)
	if err != nil {
		return err
	}
	if at.Before(cert.NotBefore) || at.After(cert.NotAfter) {
		return &Error{ReasonBadSignature, "the signing certificate was not valid at the SNS Timestamp"}
	}
	key, ok := cert.PublicKey.(*rsa.PublicKey)
	if !ok {
		return &Error{ReasonBadSignature, "the signing certificate's key is not RSA"}
	}
	if err := rsa.VerifyPKCS1v15(key, hash, digest(hash, stringToSign(env)), sig); err != nil {
		return &Error{ReasonBadSignature, "the SNS signature does not verify"}
	}
	return nil
}

// stringToSign is what SNS signs for a Notification: each field's name and value on a
// line of its own, in this order, Subject only when present.
func stringToSign(env snsEnvelope) string {
	var b strings.Builder
	add := func(name, value string) {
		b.WriteString(name)
		b.WriteByte('\n')
		b.WriteString(value)
		b.WriteByte('\n')
	}
	add("Message", env.Message)
	add("MessageId", env.MessageID)
	if env.Subject != nil {
		add("Subject", *env.Subject)
	}
	add("Timestamp", env.Timestamp)
	add("TopicArn", env.TopicArn)
	add("Type", env.Type)
	return b.String()
}

func digest(hash crypto.Hash, s string) []byte {
	if hash == crypto.SHA1 {
		d := sha1.Sum([]byte(s))
		return d[:]
	}
	d := sha256.Sum256([]byte(s))
	return d[:]
}

// snsCertURL is raw when it is a certificate on SNS's host: https, no user, port, query
// or fragment, a path ending in .pem.
func snsCertURL(raw string) (string, bool) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" || u.Opaque != "" || u.User != nil || u.RawQuery != "" || u.ForceQuery ||
		u.Fragment != "" || !certHost.MatchString(u.Host) || !strings.HasSuffix(u.Path, ".pem") {
		return "", false
	}
	return u.String(), true
}

// cert is the certificate at url, fetched the first time and kept.
func (v *Verifier) cert(ctx context.Context, url string) (*x509.Certificate, error) {
	v.mu.Lock()
	c := v.certs[url]
	v.mu.Unlock()
	if c != nil {
		return c, nil
	}
	b, err := v.fetch(ctx, url)
	if errors.Is(err, ErrNoCert) {
		return nil, &Error{ReasonBadSignature, "no signing certificate at SigningCertURL"}
	}
	if err != nil {
		return nil, fmt.Errorf("fetch the SNS signing certificate: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, &Error{ReasonBadSignature, "SigningCertURL holds no PEM certificate"}
	}
	if c, err = x509.ParseCertificate(block.Bytes); err != nil {
		return nil, &Error{ReasonBadSignature, "SigningCertURL holds no X.509 certificate"}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.certs) >= maxCerts {
		clear(v.certs) // SNS uses a few; more is someone naming paths of SNS's host
	}
	v.certs[url] = c
	return c, nil
}

// HTTPSFetch fetches signing certificates with client (nil: a client of its own): TLS as
// the client verifies it, at most certTimeout (unless the client sets a timeout), at
// most maxCertSize, and no redirect to another host or off https.
func HTTPSFetch(client *http.Client) FetchFunc {
	c := &http.Client{}
	if client != nil {
		*c = *client
	}
	if c.Timeout == 0 {
		c.Timeout = certTimeout
	}
	c.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if req.URL.Scheme != "https" || req.URL.Host != via[0].URL.Host || len(via) >= 3 {
			return fmt.Errorf("redirected off %s: %w", via[0].URL.Host, ErrNoCert)
		}
		return nil
	}
	return func(ctx context.Context, url string) ([]byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrNoCert, err)
		}
		resp, err := c.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		switch {
		case resp.StatusCode >= 400 && resp.StatusCode < 500:
			return nil, fmt.Errorf("GET %s: %s: %w", url, resp.Status, ErrNoCert)
		case resp.StatusCode != http.StatusOK:
			return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		b, err := io.ReadAll(io.LimitReader(resp.Body, maxCertSize+1))
		if err != nil {
			return nil, fmt.Errorf("GET %s: %w", url, err)
		}
		if len(b) > maxCertSize {
			return nil, fmt.Errorf("GET %s: more than %d bytes: %w", url, maxCertSize, ErrNoCert)
		}
		return b, nil
	}
}
