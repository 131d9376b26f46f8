// Package keys holds the secret keys of otpflow: the pepper that turns a code into the
// HMAC stored at rest, and the AES-256-GCM key that seals a code for its one hop from the
// issuer to the dispatcher, and the key that turns an address or a client IP into the
// keyed hash every store knows a person by (Subjects). All come as key rings with ids, so
// keys rotate: the first key is active, the others still verify, unseal or look up what
// was made under them.
package keys

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/otpflow/otpflow/events"
)

// ErrUnknownKey is returned for a key id the ring does not hold.
var ErrUnknownKey = errors.New("unknown key id")

// ErrOpen is returned when sealed data fails authentication.
var ErrOpen = errors.New("sealed data does not authenticate")

// Ring is an ordered set of keys with ids; the first is active.
type Ring struct {
	active string
	keys   map[string][]byte
	order  []string
}

// DefaultID is the id of a key given without one ("base64" instead of "id:base64").
const DefaultID = "k1"

var idPattern = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,32}$`)

// Parse reads a key ring in the form "base64" or "id:base64,id:base64" (first is active).
// Every key must be at least minLen bytes, or exactly exactLen bytes when exactLen > 0.
// Errors never quote key material.
func Parse(value string, minLen, exactLen int) (*Ring, error) {
	value = strings.TrimSpace(value)
	if value == "" {
		return nil, errors.New("not set")
	}
	r := &Ring{keys: map[string][]byte{}}
	for i, part := range strings.Split(value, ",") {
		id, b64 := DefaultID, strings.TrimSpace(part)
		if j := strings.IndexByte(b64, ':'); j >= 0 {
			id, b64 = b64[:j], b64[j+1:]
		} else if i > 0 {
			return nil, fmt.Errorf("key %d: several keys need ids (id:base64,id:base64)", i+1)
		}
		if !idPattern.MatchString(id) {
			return nil, fmt.Errorf("key %d: id must be 1-32 of [A-Za-z0-9_.-]", i+1)
		}
		if _, dup := r.keys[id]; dup {
			return nil, fmt.Errorf("key %d: duplicate id %q", i+1, id)
		}
		key, err := decodeBase64(b64)
		if err != nil {
			return nil, fmt.Errorf("key %q: not base64", id)
		}
		if exactLen > 0 && len(key) != exactLen {
			return nil, fmt.Errorf("key %q: must be exactly %d bytes, got %d", id, exactLen, len(key))
		}
		if len(key) < minLen {
			return nil, fmt.Errorf("key %q: must be at least %d bytes, got %d", id, minLen, len(key))
		}
		r.keys[id] = key
		r.order = append(r.order, id)
	}
	r.active = r.order[0]
	return r, nil
}

func decodeBase64(s string) ([]byte, error) {
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(s); err == nil {
			return b, nil
		}
	}
	return nil, errors.New("not base64")
}

// ActiveID is the id of the key used for new codes.
func (r *Ring) ActiveID() string { return r.active }

// IDs lists the key ids, active first.
func (r *Ring) IDs() []string { return append([]string(nil), r.order...) }

// Generate returns a ring value ("id:base64") holding one fresh random key of n bytes.
func Generate(id string, n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return id + ":" + base64.StdEncoding.EncodeToString(b)
}

// Pepper computes code MACs: HMAC-SHA256(key, challengeID ‖ 0x00 ‖ code).
type Pepper struct{ ring *Ring }

// ParsePepper reads OTP_CODE_PEPPER: keys of at least 32 bytes.
func ParsePepper(value string) (*Pepper, error) {
	r, err := Parse(value, 32, 0)
	if err != nil {
		return nil, err
	}
	return &Pepper{r}, nil
}

// ActiveID is the id of the pepper used for new codes.
func (p *Pepper) ActiveID() string { return p.ring.active }

// MAC returns the code MAC under the pepper keyID.
func (p *Pepper) MAC(keyID, challengeID, code string) ([]byte, error) {
	key, ok := p.ring.keys[keyID]
	if !ok {
		return nil, fmt.Errorf("pepper %q: %w", keyID, ErrUnknownKey)
	}
	m := hmac.New(sha256.New, key)
	m.Write([]byte(challengeID))
	m.Write([]byte{0})
	m.Write([]byte(code))
	return m.Sum(nil), nil
}

// Equal reports, in constant time for the code, whether code matches mac under keyID.
func (p *Pepper) Equal(keyID, challengeID, code string, mac []byte) (bool, error) {
	got, err := p.MAC(keyID, challengeID, code)
	if err != nil {
		return false, err
	}
	return hmac.Equal(got, mac), nil
}

// Sealer seals with AES-256-GCM under a key ring. The dispatch job is sealed whole
// (SealJob); callers bind what stays outside the seal as associated data.
type Sealer struct{ ring *Ring }

// ParseSealer reads OTP_SEAL_KEY: keys of exactly 32 bytes.
func ParseSealer(value string) (*Sealer, error) {
	r, err := Parse(value, 32, 32)
	if err != nil {
		return nil, err
	}
	return &Sealer{r}, nil
}

// ActiveID is the id of the key used to seal.
func (s *Sealer) ActiveID() string { return s.ring.active }

// Seal seals plaintext under the active key, bound to ad, and returns the key id and
// nonce ‖ ciphertext.
func (s *Sealer) Seal(ad, plaintext []byte) (string, []byte, error) {
	aead, err := s.aead(s.ring.active)
	if err != nil {
		return "", nil, err
	}
	nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(plaintext)+aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return "", nil, err
	}
	return s.ring.active, aead.Seal(nonce, nonce, plaintext, ad), nil
}

// Open unseals what Seal sealed under keyID with the same ad. Any change to the sealed
// bytes or to ad gives ErrOpen.
func (s *Sealer) Open(keyID string, ad, sealed []byte) ([]byte, error) {
	aead, err := s.aead(keyID)
	if err != nil {
		return nil, err
	}
	n := aead.NonceSize()
	if len(sealed) < n+aead.Overhead() {
		return nil, ErrOpen
	}
	plain, err := aead.Open(nil, sealed[:n], sealed[n:], ad)
	if err != nil {
		return nil, ErrOpen
	}
	return plain, nil
}

// SealJob seals a whole dispatch job under the active key; only the format, the tenant
// and the key id stay outside, bound as associated data.
func (s *Sealer) SealJob(job events.DispatchJob) (events.SealedDispatch, error) {
	plain, err := json.Marshal(job)
	if err != nil {
		return events.SealedDispatch{}, err
	}
	id := s.ring.active
	_, sealed, err := s.Seal(events.DispatchAD(events.DispatchFormat, job.Tenant, id), plain)
	if err != nil {
		return events.SealedDispatch{}, err
	}
	return events.SealedDispatch{Format: events.DispatchFormat, Tenant: job.Tenant, SealKeyID: id, Sealed: sealed}, nil
}

// OpenJob opens a sealed dispatch job and checks it: the job must authenticate under its
// routing fields, decode, and name the same tenant as the outside.
func (s *Sealer) OpenJob(d events.SealedDispatch) (events.DispatchJob, error) {
	plain, err := s.Open(d.SealKeyID, events.DispatchAD(d.Format, d.Tenant, d.SealKeyID), d.Sealed)
	if err != nil {
		return events.DispatchJob{}, err
	}
	job, err := events.DecodeDispatchJob(plain)
	if err != nil {
		return events.DispatchJob{}, fmt.Errorf("sealed job: %w", err)
	}
	if job.Tenant != d.Tenant {
		return events.DispatchJob{}, fmt.Errorf("sealed job: tenant does not match: %w", ErrOpen)
	}
	return job, nil
}

func (s *Sealer) aead(keyID string) (cipher.AEAD, error) {
	key, ok := s.ring.keys[keyID]
	if !ok {
		return nil, fmt.Errorf("seal key %q: %w", keyID, ErrUnknownKey)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// Key returns the key with id, or nil.
func (r *Ring) Key(id string) []byte { return r.keys[id] }

// SealDeadLetter seals a dead-lettered message whole under the active key (OTP_DLQ_KEY):
// only the format, the tenant and the key id stay outside, bound as associated data
// with the origin and the recipient hash header.
func (s *Sealer) SealDeadLetter(tenant, stream string, seq uint64, recipientHash string, dl events.DeadLetter) (events.SealedDeadLetter, error) {
	plain, err := json.Marshal(dl)
	if err != nil {
		return events.SealedDeadLetter{}, err
	}
	id := s.ring.active
	_, sealed, err := s.Seal(events.DeadLetterAD(events.DeadLetterFormat, tenant, id, stream, seq, recipientHash), plain)
	if err != nil {
		return events.SealedDeadLetter{}, err
	}
	return events.SealedDeadLetter{Format: events.DeadLetterFormat, Tenant: tenant, KeyID: id, Sealed: sealed}, nil
}

// OpenDeadLetter opens a sealed dead letter found with the origin stream and seq and the
// recipient hash header: any change to them or to the body gives ErrOpen.
func (s *Sealer) OpenDeadLetter(d events.SealedDeadLetter, stream string, seq uint64, recipientHash string) (events.DeadLetter, error) {
	plain, err := s.Open(d.KeyID, events.DeadLetterAD(d.Format, d.Tenant, d.KeyID, stream, seq, recipientHash), d.Sealed)
	if err != nil {
		return events.DeadLetter{}, err
	}
	var dl events.DeadLetter
	if err := json.Unmarshal(plain, &dl); err != nil {
		return events.DeadLetter{}, fmt.Errorf("sealed dead letter: %w", err)
	}
	return dl, nil
}

// SharesKey reports whether s and o hold a key in common, whatever its id.
func (s *Sealer) SharesKey(o *Sealer) bool {
	for _, a := range s.ring.keys {
		for _, b := range o.ring.keys {
			if hmac.Equal(a, b) {
				return true
			}
		}
	}
	return false
}
