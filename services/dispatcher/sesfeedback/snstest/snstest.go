// Package snstest signs SNS notifications as Amazon SNS does, for tests of
// sesfeedback.Verifier: SignatureVersion 1 (SHA1withRSA) or 2 (SHA256withRSA) over the
// string to sign AWS documents, with an RSA key and a self-signed certificate made for
// the test, which Fetch serves at the topic's SigningCertURL. It builds the string to
// sign on its own, from AWS's description, not from the code under test.
package snstest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"testing"
	"time"

	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback"
)

// CertURL is where the certificate of a Topic is served unless Options say otherwise: a
// URL on SNS's own host, as SNS gives it.
const CertURL = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem"

// Options of New; the zero value is a certificate at CertURL valid from a year ago to a
// year ahead.
type Options struct {
	CertURL             string
	NotBefore, NotAfter time.Time
}

// Topic signs notifications of one topic ARN. Topics made by WithARN share the key, as
// SNS signs every topic of a region with one certificate.
type Topic struct {
	ARN     string
	CertURL string
	CertPEM []byte
	key     *rsa.PrivateKey
	tb      testing.TB
}

// New makes a key and a self-signed certificate and returns the topic arn signed with
// them.
func New(tb testing.TB, arn string, o Options) *Topic {
	tb.Helper()
	if o.CertURL == "" {
		o.CertURL = CertURL
	}
	if o.NotBefore.IsZero() {
		o.NotBefore = time.Now().Add(-365 * 24 * time.Hour)
	}
	if o.NotAfter.IsZero() {
		o.NotAfter = time.Now().Add(365 * 24 * time.Hour)
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sns.amazonaws.com"},
		NotBefore: o.NotBefore, NotAfter: o.NotAfter, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	return &Topic{ARN: arn, CertURL: o.CertURL, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), key: key, tb: tb}
}

// WithARN is the topic arn, signed with t's key and certificate.
func (t *Topic) WithARN(arn string) *Topic {
	c := *t
	c.ARN = arn
	return &c
}

// Notification is an SNS notification as SQS holds it without raw message delivery, its
// fields in SNS's order.
type Notification struct {
	Type             string  `json:"Type"`
	MessageID        string  `json:"MessageId"`
	TopicArn         string  `json:"TopicArn"`
	Subject          *string `json:"Subject,omitempty"`
	Message          string  `json:"Message"`
	Timestamp        string  `json:"Timestamp"`
	SignatureVersion string  `json:"SignatureVersion"`
	Signature        string  `json:"Signature"`
	SigningCertURL   string  `json:"SigningCertURL"`
	UnsubscribeURL   string  `json:"UnsubscribeURL"`
}

// Publish is the notification of message that SNS would deliver for t, with id, time at
// and SignatureVersion version ("1" or "2"), signed.
func (t *Topic) Publish(id, message string, at time.Time, version string) Notification {
	n := Notification{Type: "Notification", MessageID: id, TopicArn: t.ARN, Message: message,
		Timestamp: at.UTC().Format("2006-01-02T15:04:05.000Z"), SignatureVersion: version, SigningCertURL: t.CertURL,
		UnsubscribeURL: "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=" + t.ARN + ":0c2d3e4f"}
	t.Sign(&n)
	return n
}

// Sign sets n's Signature to t's signature of n as it stands, by its SignatureVersion.
func (t *Topic) Sign(n *Notification) {
	s := "Message\n" + n.Message + "\nMessageId\n" + n.MessageID + "\n"
	if n.Subject != nil {
		s += "Subject\n" + *n.Subject + "\n"
	}
	s += "Timestamp\n" + n.Timestamp + "\nTopicArn\n" + n.TopicArn + "\nType\n" + n.Type + "\n"
	var sig []byte
	var err error
	switch n.SignatureVersion {
	case "1":
		d := sha1.Sum([]byte(s))
		sig, err = rsa.SignPKCS1v15(rand.Reader, t.key, crypto.SHA1, d[:])
	case "2":
		d := sha256.Sum256([]byte(s))
		sig, err = rsa.SignPKCS1v15(rand.Reader, t.key, crypto.SHA256, d[:])
	default:
		err = fmt.Errorf("SignatureVersion %q", n.SignatureVersion)
	}
	if err != nil {
		t.tb.Fatalf("snstest: sign: %v", err)
	}
	n.Signature = base64.StdEncoding.EncodeToString(sig)
}

// JSON is n as the body of the SQS message.
func (n Notification) JSON() string {
	var b bytes.Buffer
	e := json.NewEncoder(&b)
	e.SetEscapeHTML(false)
	_ = e.Encode(n) // strings only: it cannot fail
	return string(bytes.TrimSpace(b.Bytes()))
}

// Fetch serves each topic's certificate at its CertURL (the first topic's, when two
// share one), and answers sesfeedback.ErrNoCert for any other URL.
func Fetch(topics ...*Topic) sesfeedback.FetchFunc {
	certs := map[string][]byte{}
	for _, t := range topics {
		if _, ok := certs[t.CertURL]; !ok {
			certs[t.CertURL] = t.CertPEM
		}
	}
	return func(_ context.Context, url string) ([]byte, error) {
		if b, ok := certs[url]; ok {
			return b, nil
		}
		return nil, fmt.Errorf("GET %s: 404 Not Found: %w", url, sesfeedback.ErrNoCert)
	}
}
