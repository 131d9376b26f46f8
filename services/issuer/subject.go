package issuer

import (
	"errors"
	"strings"
)

// A person and a client are known to the issuer only by their keyed hashes
// (keys.Subjects, OTP_SUBJECT_KEY): rate-limit keys, the ip fanout set and a challenge's
// recipient_key hold hashes, never an address or an IP. During a key rotation the state
// of one person lives under one hash per key of the ring: the issuer locks and reads the
// rows under every hash, decides on their union, and writes the union back under every
// hash. So a limit holds across the rotation, also while replicas with the old ring and
// with the new one run side by side (each row is the whole state as its writer saw it).

// identify computes the hashes of r's recipient and client under every subject key,
// active first.
func (s *Service) identify(r *request) {
	r.subjects = s.cfg.Subjects.SubjectHashes(r.tenant, r.req.Recipient)
	r.clients = nil
	if r.req.Context.IP != "" {
		r.clients = s.cfg.Subjects.ClientHashes(r.tenant, r.req.Context.IP)
	}
}

// rcptKey is the request's recipient and purpose under the active hash.
func (r *request) rcptKey() rcptKey { return rcptKey{r.tenant, r.subjects[0], r.req.Purpose} }

// clientKey is the request's client under the active hash; ok is false without an IP.
func (r *request) clientKey() (clientKey, bool) {
	if len(r.clients) == 0 {
		return clientKey{}, false
	}
	return clientKey{r.tenant, r.clients[0]}, true
}

// rcptRates and ipRates are the rate_log keys of r under every hash, active first.
func (r *request) rcptRates() []string {
	return mapHashes(r.subjects, func(h string) string { return rcptRate(r.tenant, h, r.req.Purpose) })
}

func (r *request) ipRates() []string {
	return mapHashes(r.clients, func(h string) string { return ipRate(r.tenant, h) })
}

func mapHashes(hashes []string, f func(string) string) []string {
	out := make([]string, len(hashes))
	for i, h := range hashes {
		out[i] = f(h)
	}
	return out
}

// seenSet is the recipients one client asked codes for, per subject key id. Every hash
// of a recipient is written, so the set of the oldest key still in the ring holds the
// most; the largest set is the count.
type seenSet map[string]map[string]bool

func keyID(hash string) string { id, _, _ := strings.Cut(hash, ":"); return id }

func (s seenSet) add(hash string) {
	id := keyID(hash)
	if s[id] == nil {
		s[id] = map[string]bool{}
	}
	s[id][hash] = true
}

// has reports whether the recipient of hashes (one per key) is in the set.
func (s seenSet) has(hashes []string) bool {
	for _, h := range hashes {
		if s[keyID(h)][h] {
			return true
		}
	}
	return false
}

func (s seenSet) count() int {
	n := 0
	for _, set := range s {
		n = max(n, len(set))
	}
	return n
}

// ipRecipient is one ip_recipients row: a client and a recipient under one key.
type ipRecipient struct{ tenant, ipHash, recipientHash string }

// recipientAD binds a sealed recipient to its challenge.
func recipientAD(challengeID string) []byte {
	return []byte("issuer.challenges.recipient:" + challengeID)
}

// openRecipient unseals the address a challenge was created with, where its codes go.
func (s *Service) openRecipient(c *challenge) error {
	if c.address != "" {
		return nil
	}
	if c.sealed == nil {
		return errors.New("the challenge has no sealed recipient")
	}
	plain, err := s.cfg.Sealer.Open(c.sealKeyID, recipientAD(c.id), c.sealed)
	if err != nil {
		return err
	}
	c.address = string(plain)
	return nil
}
