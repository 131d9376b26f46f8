package keys_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
)

func testJob() events.DispatchJob {
	at := time.Date(2026, 11, 30, 10, 0, 0, 0, time.UTC)
	return events.DispatchJob{ChallengeID: "2eedf1ad-5135-4c42-a28f-5b09316ec196", Tenant: "acme", RequestID: "req-h1", CodeSeq: 1,
		Recipient: "ana@example.com", Purpose: "login", Locale: "en", IssuedAt: at, ExpiresAt: at.Add(5 * time.Minute), Code: "493027"}
}

func TestSealJobOpenAndRotation(t *testing.T) {
	oldRing := keys.Generate("k1", 32)
	newRing := keys.Generate("k2", 32) + "," + oldRing
	old, err := keys.ParseSealer(oldRing)
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := old.SealJob(testJob())
	if err != nil || sealed.SealKeyID != "k1" || sealed.Tenant != "acme" || sealed.Format != events.DispatchFormat {
		t.Fatalf("seal: %+v %v", sealed, err)
	}
	// Outside the seal only the routing fields; inside, nothing readable. (The wire's
	// base64 of random bytes may spell anything short, so the sealed bytes are searched.)
	wire, _ := json.Marshal(sealed)
	var outside map[string]any
	_ = json.Unmarshal(wire, &outside)
	delete(outside, "sealed")
	rest, _ := json.Marshal(outside)
	for _, secret := range []string{"493027", "ana@example.com", "2eedf1ad", "login", "req-h1"} {
		if strings.Contains(string(rest), secret) || strings.Contains(string(sealed.Sealed), secret) {
			t.Fatalf("the sealed job shows %q in the clear: %s", secret, wire)
		}
	}
	rotated, err := keys.ParseSealer(newRing)
	if err != nil {
		t.Fatal(err)
	}
	if rotated.ActiveID() != "k2" {
		t.Fatalf("active = %s", rotated.ActiveID())
	}
	if job, err := rotated.OpenJob(sealed); err != nil || job != testJob() {
		t.Fatalf("open after rotation: %+v %v", job, err)
	}

	// Every field outside the seal is bound to it, and every sealed byte is authenticated.
	tamper := map[string]func(d *events.SealedDispatch){
		"another tenant": func(d *events.SealedDispatch) { d.Tenant = "other" },
		"another format": func(d *events.SealedDispatch) { d.Format = "otpflow.dispatch.sealed.v3" },
		"a flipped byte": func(d *events.SealedDispatch) { d.Sealed[len(d.Sealed)/2] ^= 1 },
		"a short body":   func(d *events.SealedDispatch) { d.Sealed = d.Sealed[:10] },
	}
	for name, f := range tamper {
		d := sealed
		d.Sealed = append([]byte(nil), sealed.Sealed...)
		f(&d)
		if _, err := rotated.OpenJob(d); !errors.Is(err, keys.ErrOpen) {
			t.Errorf("%s: err = %v, want ErrOpen", name, err)
		}
	}
	d := sealed
	d.SealKeyID = "k9"
	if _, err := rotated.OpenJob(d); !errors.Is(err, keys.ErrUnknownKey) {
		t.Fatalf("unknown key: %v", err)
	}
}

// TestSealedJobMustNameItsTenant: a job sealed for one tenant with a key that holds for
// several cannot be moved under another tenant's routing fields even by whoever can seal.
func TestSealedJobMustNameItsTenant(t *testing.T) {
	s, err := keys.ParseSealer(keys.Generate("k1", 32))
	if err != nil {
		t.Fatal(err)
	}
	plain, _ := json.Marshal(testJob())
	id, blob, err := s.Seal(events.DispatchAD(events.DispatchFormat, "other", "k1"), plain)
	if err != nil {
		t.Fatal(err)
	}
	d := events.SealedDispatch{Format: events.DispatchFormat, Tenant: "other", SealKeyID: id, Sealed: blob}
	if _, err := s.OpenJob(d); !errors.Is(err, keys.ErrOpen) {
		t.Fatalf("job of acme under tenant other: err = %v, want ErrOpen", err)
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
