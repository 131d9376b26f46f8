package keys

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"strings"

	"github.com/otpflow/otpflow/events"
)

// Subjects names a person and a client network by keyed hash, scoped by tenant: the one
// identity under which otpflow keys rate limits, failure caps and erasure, so that no key
// or column needs the plaintext address or IP (OTP_SUBJECT_KEY). A hash reads
// "id:base64url(HMAC-SHA256(key, domain ‖ tenant ‖ value))"; the id names the key of the
// ring it was made under.
//
// Rotation: a new key goes first in the ring, the old ones stay. Lookups use the hashes
// under every key (SubjectHashes, ClientHashes), so state written under an old key still
// counts; keep an old key until the longest window that state serves (the hourly limits,
// the failure cap, the retention of challenges) has passed.
type Subjects struct{ ring *Ring }

// ParseSubjects reads OTP_SUBJECT_KEY: keys of at least 32 bytes.
func ParseSubjects(value string) (*Subjects, error) {
	r, err := Parse(value, 32, 0)
	if err != nil {
		return nil, err
	}
	return &Subjects{r}, nil
}

// Domains keep a person's hash and a client's hash apart even for equal text.
const (
	subjectDomain = "otpflow/subject/v1"
	clientDomain  = "otpflow/client/v1"
	tagDomain     = "otpflow/mail-tags/v1"
)

// ActiveID is the id of the key new hashes are made under.
func (s *Subjects) ActiveID() string { return s.ring.active }

// Subject is the hash of a person of tenant under the active key. The address is taken
// to events.CanonicalAddress first, so every spelling of one address is one person.
func (s *Subjects) Subject(tenant, address string) string {
	return s.hash(s.ring.active, subjectDomain, tenant, events.CanonicalAddress(address))
}

// Client is the hash of a client of tenant under the active key, counted by
// events.ClientNetwork (an IPv4 address, the /64 of an IPv6 one).
func (s *Subjects) Client(tenant, ip string) string {
	return s.hash(s.ring.active, clientDomain, tenant, events.ClientNetwork(ip))
}

// SubjectHashes is Subject under every key of the ring, active first: what a lookup
// tries, so state written before a rotation is found.
func (s *Subjects) SubjectHashes(tenant, address string) []string {
	return s.all(subjectDomain, tenant, events.CanonicalAddress(address))
}

// ClientHashes is Client under every key of the ring, active first.
func (s *Subjects) ClientHashes(tenant, ip string) []string {
	return s.all(clientDomain, tenant, events.ClientNetwork(ip))
}

// MatchesSubject reports whether hash, made under any key of the ring, names the person
// address of tenant. A hash under a key the ring no longer holds matches nothing.
func (s *Subjects) MatchesSubject(hash, tenant, address string) bool {
	id, _, ok := strings.Cut(hash, ":")
	if !ok || s.ring.keys[id] == nil {
		return false
	}
	return hmac.Equal([]byte(hash), []byte(s.hash(id, subjectDomain, tenant, events.CanonicalAddress(address))))
}

// TagMAC authenticates value, the identity a sent mail carries in its provider tags
// (tenant, challenge, code and recipient), under the active key: "id:base64url(HMAC)".
// A provider's notification that reports the tags back is believed only if its MAC
// verifies (VerifyTagMAC), so whoever can write to the notification queue still cannot
// name an arbitrary person or code.
func (s *Subjects) TagMAC(tenant, value string) string {
	return s.hash(s.ring.active, tagDomain, tenant, value)
}

// VerifyTagMAC reports whether mac is TagMAC(tenant, value) under a key the ring still
// holds.
func (s *Subjects) VerifyTagMAC(mac, tenant, value string) bool {
	id, _, ok := strings.Cut(mac, ":")
	if !ok || s.ring.keys[id] == nil {
		return false
	}
	return hmac.Equal([]byte(mac), []byte(s.hash(id, tagDomain, tenant, value)))
}

func (s *Subjects) all(domain, tenant, value string) []string {
	out := make([]string, 0, len(s.ring.order))
	for _, id := range s.ring.order {
		out = append(out, s.hash(id, domain, tenant, value))
	}
	return out
}

// hash is id ":" base64url(HMAC(key id, domain ‖ 0 ‖ len(tenant) ‖ tenant ‖ value)): the
// tenant's length makes the split between tenant and value unambiguous.
func (s *Subjects) hash(id, domain, tenant, value string) string {
	m := hmac.New(sha256.New, s.ring.keys[id])
	m.Write([]byte(domain))
	m.Write([]byte{0})
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(tenant)))
	m.Write(n[:])
	m.Write([]byte(tenant))
	m.Write([]byte(value))
	return id + ":" + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}
