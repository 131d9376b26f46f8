package events_test

import (
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// TestChallengesStreamIsTheVerifiersAlone: the code HMACs and sessions live on a stream of
// their own, kept no longer than a code can live plus a margin, deletable, apart from the
// audit stream; the verifier reads it, and its consumer of earlier releases on the audit
// stream is unchanged, so it resumes where it stopped.
func TestChallengesStreamIsTheVerifiersAlone(t *testing.T) {
	byName := map[string]jetstream.StreamConfig{}
	for _, c := range events.StreamConfigs(events.StreamOptions{}) {
		byName[c.Name] = c
	}
	ch, ok := byName[events.StreamChallenges]
	if !ok {
		t.Fatal("no OTP_CHALLENGES stream")
	}
	if !slices.Equal(ch.Subjects, []string{"otp.challenge.*", "otp.challenge_superseded.*"}) || ch.MaxAge != events.MaxCodeTTL+time.Hour ||
		ch.Storage != jetstream.FileStorage || ch.Retention != jetstream.LimitsPolicy || ch.Duplicates != events.DuplicateWindow ||
		ch.DenyDelete || ch.DenyPurge || ch.AllowDirect {
		t.Fatalf("OTP_CHALLENGES config %+v", ch)
	}
	for _, s := range byName[events.StreamEvents].Subjects {
		if slices.Contains(ch.Subjects, s) {
			t.Fatalf("%s is on both streams", s)
		}
	}
	if v := events.VerifierConsumer; v.Durable != events.ConsumerVerifier ||
		!slices.Equal(v.FilterSubjects, []string{"otp.challenge.*", "otp.challenge_superseded.*"}) {
		t.Fatalf("the verifier's consumer %+v does not read OTP_CHALLENGES", v)
	}
	if v := events.VerifierLegacyConsumer; v.Durable != events.ConsumerVerifier ||
		!slices.Equal(v.FilterSubjects, []string{"otp.issued.*", "otp.superseded.*"}) || v.DeliverPolicy != jetstream.DeliverAllPolicy ||
		v.AckWait != 30*time.Second || v.MaxDeliver != 50 || v.MaxAckPending != 2000 || v.Description != "verifier: projection of issued and superseded challenges" {
		t.Fatalf("the verifier's consumer of earlier releases changed: %+v", v)
	}
}
