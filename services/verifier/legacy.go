//lint:file-ignore SA1019 reading the deprecated fields of earlier releases is this file's purpose

package verifier

import "github.com/otpflow/otpflow/events"

// legacyChallenge reads an otp.issued of an earlier release, which carried the code
// HMAC, the session and the plaintext recipient, as the challenge it announced; the
// recipient is kept only as its subject hashes under every key of the ring. For one
// release: see events.VerifierLegacyConsumer.
func (s *Service) legacyChallenge(tenant string, e events.Issued) (events.Challenge, error) {
	if len(e.Recipient) > maxRecipient {
		return events.Challenge{}, field("recipient", "longer than %d bytes", maxRecipient)
	}
	if err := text("recipient", e.Recipient); err != nil {
		return events.Challenge{}, err
	}
	return events.Challenge{ChallengeID: e.ChallengeID, Tenant: e.Tenant, RequestID: e.RequestID, CodeSeq: e.CodeSeq,
		CodeLength: e.CodeLength, CodeHMAC: e.CodeHMAC, PepperKeyID: e.PepperKeyID, MaxAttempts: e.MaxAttempts,
		SessionID: e.SessionID, RecipientHashes: s.cfg.Subjects.SubjectHashes(tenant, e.Recipient), Resend: e.Resend,
		IssuedAt: e.IssuedAt, ExpiresAt: e.ExpiresAt, Test: e.Test, Risk: e.Risk}, nil
}

// legacyRecipientKey is the recipient of an otp.issued of an earlier release, which
// carried the address rather than its subject hash, as its hash under the verifier's
// active key (the status projection's recipient_key; an erasure names the person under
// every key of the ring). Empty when the event carries neither.
func (s *Service) legacyRecipientKey(tenant string, e events.Issued) (string, error) {
	if e.Recipient == "" {
		return "", nil
	}
	if len(e.Recipient) > maxRecipient {
		return "", field("recipient", "longer than %d bytes", maxRecipient)
	}
	return s.cfg.Subjects.Subject(tenant, e.Recipient), nil
}
