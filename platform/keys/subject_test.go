package keys_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/otpflow/otpflow/platform/keys"
)

func TestSubjectHashes(t *testing.T) {
	old := keys.Generate("k1", 32)
	s1, err := keys.ParseSubjects(old)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := keys.ParseSubjects(keys.Generate("k2", 48) + "," + old)
	if err != nil {
		t.Fatal(err)
	}
	h := s1.Subject("acme", "Ana@Example.com")
	if !strings.HasPrefix(h, "k1:") || strings.Contains(strings.ToLower(h), "ana") || strings.Contains(h, "example") {
		t.Fatalf("hash %q", h)
	}
	for name, got := range map[string]string{
		"another spelling":  s1.Subject("acme", " ana@EXAMPLE.com"),
		"the canonical one": s1.Subject("acme", "ana@example.com"),
	} {
		if got != h {
			t.Errorf("%s: %q, want %q", name, got, h)
		}
	}
	for name, got := range map[string]string{
		"another tenant":    s1.Subject("other", "ana@example.com"),
		"another person":    s1.Subject("acme", "bo@example.com"),
		"a client, not one": s1.Client("acme", "ana@example.com"),
		"tenant boundary":   s1.Subject("acmea", "na@example.com"),
	} {
		if got == h {
			t.Errorf("%s: same hash as ana of acme", name)
		}
	}
	// After a rotation: the new key is active, the old hash is still among the lookups.
	all := s2.SubjectHashes("acme", "ana@example.com")
	if len(all) != 2 || !strings.HasPrefix(all[0], "k2:") || all[0] != s2.Subject("acme", "ana@example.com") || all[1] != h {
		t.Fatalf("hashes after rotation %q, want [k2:…, %s]", all, h)
	}
	if !s2.MatchesSubject(h, "acme", "ANA@example.com") || !s2.MatchesSubject(all[0], "acme", "ana@example.com") {
		t.Error("a hash under either key does not match its address")
	}
	for _, bad := range []string{s2.Subject("acme", "bo@example.com"), "k9:" + strings.TrimPrefix(h, "k1:"), "", "k1"} {
		if s2.MatchesSubject(bad, "acme", "ana@example.com") {
			t.Errorf("%q matches ana", bad)
		}
	}
	// Clients count by network: spellings of one IPv4 address and one IPv6 /64 are one.
	if s1.Client("acme", "::ffff:192.0.2.1") != s1.Client("acme", "192.0.2.1") ||
		s1.Client("acme", "2001:db8:1:2::1") != s1.Client("acme", "2001:db8:1:2:ffff::9") ||
		s1.Client("acme", "2001:db8:1:3::1") == s1.Client("acme", "2001:db8:1:2::1") {
		t.Error("client hashes do not follow events.ClientNetwork")
	}
	if c := s2.ClientHashes("acme", "192.0.2.1"); len(c) != 2 || c[1] != s1.Client("acme", "192.0.2.1") || slices.Contains(c, "") {
		t.Fatalf("client hashes %q", c)
	}
	if _, err := keys.ParseSubjects(keys.Generate("k1", 16)); err == nil {
		t.Error("a 16-byte subject key was accepted")
	}
}

// TestTagMAC: a mail's tag MAC verifies under the ring that made it, also after a
// rotation, and for nothing else: another value, another tenant, a subject hash of the
// same text (another domain), or a key the ring no longer holds.
func TestTagMAC(t *testing.T) {
	old := keys.Generate("k1", 32)
	s1, err := keys.ParseSubjects(old)
	if err != nil {
		t.Fatal(err)
	}
	rotated, err := keys.ParseSubjects(keys.Generate("k2", 32) + "," + old)
	if err != nil {
		t.Fatal(err)
	}
	dropped, err := keys.ParseSubjects(keys.Generate("k2", 32))
	if err != nil {
		t.Fatal(err)
	}
	mac := s1.TagMAC("acme", "v")
	if !s1.VerifyTagMAC(mac, "acme", "v") || !rotated.VerifyTagMAC(mac, "acme", "v") {
		t.Fatal("a MAC does not verify under its own ring")
	}
	for name, ok := range map[string]bool{
		"another value":     s1.VerifyTagMAC(mac, "acme", "w"),
		"another tenant":    s1.VerifyTagMAC(mac, "globex", "v"),
		"a subject hash":    s1.VerifyTagMAC(s1.Subject("acme", "v"), "acme", "v"),
		"a key dropped":     dropped.VerifyTagMAC(mac, "acme", "v"),
		"no key id":         s1.VerifyTagMAC(strings.TrimPrefix(mac, "k1:"), "acme", "v"),
		"another key's MAC": s1.VerifyTagMAC(rotated.TagMAC("acme", "v"), "acme", "v"),
	} {
		if ok {
			t.Errorf("%s: verified", name)
		}
	}
}
