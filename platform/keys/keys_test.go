package keys_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/otpflow/otpflow/platform/keys"
)

func TestSealOpenAndRotation(t *testing.T) {
	oldRing := keys.Generate("k1", 32)
	newRing := keys.Generate("k2", 32) + "," + oldRing
	old, err := keys.ParseSealer(oldRing)
	if err != nil {
		t.Fatal(err)
	}
	id, sealed, err := old.Seal("challenge-1", "493027")
	if err != nil || id != "k1" {
		t.Fatalf("seal: %q %v", id, err)
	}
	if strings.Contains(string(sealed), "493027") {
		t.Fatal("sealed code holds the plaintext")
	}
	rotated, err := keys.ParseSealer(newRing)
	if err != nil {
		t.Fatal(err)
	}
	if rotated.ActiveID() != "k2" {
		t.Fatalf("active = %s", rotated.ActiveID())
	}
	if code, err := rotated.Open("k1", "challenge-1", sealed); err != nil || code != "493027" {
		t.Fatalf("open after rotation: %q %v", code, err)
	}
	if _, err := rotated.Open("k1", "challenge-2", sealed); !errors.Is(err, keys.ErrOpen) {
		t.Fatalf("open under another challenge: %v", err)
	}
	sealed[len(sealed)-1] ^= 1
	if _, err := rotated.Open("k1", "challenge-1", sealed); !errors.Is(err, keys.ErrOpen) {
		t.Fatalf("open tampered: %v", err)
	}
	if _, err := rotated.Open("k9", "challenge-1", sealed); !errors.Is(err, keys.ErrUnknownKey) {
		t.Fatalf("unknown key: %v", err)
	}
}

func TestPepper(t *testing.T) {
	p, err := keys.ParsePepper(keys.Generate("p2", 32) + "," + keys.Generate("p1", 40))
	if err != nil {
		t.Fatal(err)
	}
	mac, err := p.MAC("p1", "c1", "123456")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		key, challenge, code string
		want                 bool
	}{
		{"p1", "c1", "123456", true},
		{"p1", "c1", "123457", false},
		{"p1", "c2", "123456", false},
		{"p2", "c1", "123456", false},
	} {
		if ok, err := p.Equal(tc.key, tc.challenge, tc.code, mac); err != nil || ok != tc.want {
			t.Errorf("%+v: %v %v", tc, ok, err)
		}
	}
}

func TestParseRefusesWeakOrMalformedKeys(t *testing.T) {
	for name, v := range map[string]string{
		"empty":        "",
		"short":        keys.Generate("k", 16),
		"not base64":   "k1:@@@@",
		"duplicate id": keys.Generate("k", 32) + "," + keys.Generate("k", 32),
		"bad id":       "k 1:" + strings.Repeat("A", 44),
	} {
		if _, err := keys.ParsePepper(v); err == nil {
			t.Errorf("%s: accepted", name)
		} else if strings.Contains(err.Error(), strings.Repeat("A", 10)) {
			t.Errorf("%s: error quotes key material: %v", name, err)
		}
	}
	if _, err := keys.ParseSealer(keys.Generate("k", 48)); err == nil {
		t.Error("a 48-byte seal key was accepted; AES-256 needs exactly 32")
	}
}
