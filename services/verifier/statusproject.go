package verifier

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// projectStatus is the status projection's batch handler (status.go has the rules): it
// acknowledges unread the events the stream stored before the retention cutoff, checks
// each other event like the challenge projection does (project), dead-letters the
// malformed ones with the reason and applies the rest in one transaction. If the
// transaction fails, the consumer hands each event over on its own (platform.BatchHandler).
func (s *Service) projectStatus(ctx context.Context, batch []*platform.Delivery) error {
	cutoff, err := s.statusHistoryCutoff(ctx, batch)
	if err != nil {
		return fmt.Errorf("status history cutoff: %w", err)
	}
	items := make([]*statusEvent, 0, len(batch))
	for _, d := range batch {
		if d.Meta().Timestamp.Before(cutoff) {
			// History the purge would delete (the durable's first start reads the
			// stream's whole life): not decoded, so an old event this release cannot
			// read is not dead-lettered.
			s.statusEvents.WithLabelValues("before_retention").Inc()
			d.Settle(platform.Ack())
			continue
		}
		e, err := s.checkStatusEvent(d)
		if err != nil {
			s.statusDeadLetter(d, err)
			continue
		}
		items = append(items, e)
	}
	if len(items) == 0 {
		return nil
	}
	if err := s.store.projectStatus(ctx, items, s.cfg.Retention); err != nil {
		return fmt.Errorf("project %d status events: %w", len(items), err)
	}
	for _, e := range items {
		switch n := e.msg.Meta().NumDelivered; {
		case e.refused != nil:
			s.statusDeadLetter(e.msg, e.refused)
		case e.orphan && n < statusOrphanDeliveries:
			s.statusEvents.WithLabelValues("retried").Inc()
			e.msg.Settle(platform.Retry(platform.RetryDelay(n, s.cfg.orphanDelay)))
		case e.orphan:
			s.log.Warn("feedback dropped: no status row holds its challenge", "subject", e.msg.Subject(),
				"challenge_id", e.challengeID, "deliveries", n)
			s.statusEvents.WithLabelValues("orphan_dropped").Inc()
			e.msg.Settle(platform.Ack())
		default:
			s.statusEvents.WithLabelValues("projected").Inc()
			e.msg.Settle(platform.Ack())
		}
	}
	return nil
}

// statusOrphanDeliveries is how often feedback about a challenge no row holds is
// delivered before it is dropped: the otp.issued and otp.delivered before it in the stream
// may be in a batch another replica has not committed yet, in one that failed and comes
// back after its AckWait (30 s) or its retry delay (up to 30 s), or in the hands of a
// replica that crashed; feedback, which names no request, cannot make the row. Delivered
// again after 1, 2, 4, … s, doubling up to a minute (Config.orphanDelay caps the delay),
// about five minutes in all and well within the durable's MaxDeliver (50), then
// acknowledged and counted (orphan_dropped): it is about a request the projection never
// held or no longer holds (purged after OTP_RETENTION, a complaint weeks later). Each
// such event holds one of the durable's MaxAckPending (2,000) for those minutes.
const statusOrphanDeliveries = 11

// defaultOrphanDelay is Config.orphanDelay's default.
const defaultOrphanDelay = time.Minute

// statusHistoryCutoff is the stream time before which batch's events are acknowledged
// unread: the retention cutoff on the database clock, like every cutoff, so a process
// clock ahead, by a day even, drops no current event. The database clock is read, once,
// only for a batch holding an event stored more than half the retention ago by the
// process clock (the first start, a long outage); otherwise the cutoff is the zero time.
// (A process clock behind by more than half the retention reads such history as before:
// it is checked, and makes no row, as the rules do not make rows older than retention.)
func (s *Service) statusHistoryCutoff(ctx context.Context, batch []*platform.Delivery) (time.Time, error) {
	suspect := s.now().Add(-s.cfg.Retention / 2)
	if !slices.ContainsFunc(batch, func(d *platform.Delivery) bool { return d.Meta().Timestamp.Before(suspect) }) {
		return time.Time{}, nil
	}
	now, err := s.store.clock(ctx)
	return now.Add(-s.cfg.Retention), err
}

func (s *Service) statusDeadLetter(d *platform.Delivery, reason error) {
	_, tenant, _ := events.SplitSubject(d.Subject())
	s.statusEvents.WithLabelValues("dead_letter").Inc()
	s.log.Warn("dead-letter status event", "subject", d.Subject(), "reason", reason)
	d.Settle(platform.DeadLetter(tenant, events.VerifierStatusConsumer.Durable+": "+reason.Error()))
}

// Bounds of what the status projection keeps.
const (
	maxStatusDetail = 500
	maxRejectReason = 64
)

// checkStatusEvent decodes d and validates it against its subject, like the challenge
// projection does (check): a malformed event is an error, dead-lettered with it.
func (s *Service) checkStatusEvent(d *platform.Delivery) (*statusEvent, error) {
	typ, tenant, err := events.SplitSubject(d.Subject())
	if err != nil {
		return nil, err
	}
	e := &statusEvent{msg: d, tenant: tenant}
	if typ == events.TypeErasureRequested {
		// Checked as the erasure consumers check it.
		v, err := platform.DecodeErasure(d.Subject(), d.Data())
		if err != nil {
			return nil, err
		}
		e.kind, e.hashes = statusErasure, v.RecipientHashes
		return e, nil
	}
	if !slices.Contains(events.StatusTypes, typ) {
		return nil, field("subject", "the status projection does not read %s", typ)
	}
	ev, err := events.DecodeEventOf(typ, d.Data())
	if err != nil {
		return nil, err
	}
	switch v := ev.(type) {
	case events.Issued:
		key, err := s.statusRecipientKey(tenant, v)
		if err != nil {
			return nil, err
		}
		e.kind, e.requestID, e.challengeID, e.codeSeq, e.recipientKey = statusIssued, v.RequestID, v.ChallengeID, v.CodeSeq, key
		e.at, e.expiresAt = stamp(v.IssuedAt), stamp(v.ExpiresAt)
		err = firstError(checkCommon(tenant, v.Tenant, v.ChallengeID, v.RequestID), checkCodeSeq(v.CodeSeq, 1),
			required("issued_at", v.IssuedAt), required("expires_at", v.ExpiresAt))
		return e, err
	case events.Rejected:
		if v.Tenant != tenant {
			return nil, &events.ValidationError{Reason: events.ReasonInvalidTenant, Field: "tenant", Detail: "differs from the subject's tenant"}
		}
		if err := firstError(required("rejected_at", v.RejectedAt), required("reason", v.Reason)); err != nil {
			return nil, err
		}
		if len(v.Reason) > maxRejectReason {
			return nil, field("reason", "longer than %d bytes", maxRejectReason)
		}
		if err := text("reason", string(v.Reason)); err != nil {
			return nil, err
		}
		// A request refused for its tenant or its request id cannot be asked about: the
		// status request names both, valid.
		e.skip = tenant == invalidTenant || !validRequestID(v.RequestID)
		e.kind, e.requestID, e.reason, e.detail, e.at = statusRejected, v.RequestID, v.Reason, clean(v.Detail), stamp(v.RejectedAt)
		return e, nil
	case events.Delivered:
		e.kind, e.requestID, e.challengeID, e.codeSeq, e.state, e.at = statusProgress, v.RequestID, v.ChallengeID, v.CodeSeq, events.StateSent, stamp(v.DeliveredAt)
		if v.Unconfirmed {
			e.detail = "unconfirmed"
		}
		return e, firstError(checkCommon(tenant, v.Tenant, v.ChallengeID, v.RequestID), checkCodeSeq(v.CodeSeq, 1), required("delivered_at", v.DeliveredAt))
	case events.DeliveryFailed:
		e.kind, e.requestID, e.challengeID, e.codeSeq, e.state, e.at, e.detail = statusProgress, v.RequestID, v.ChallengeID, v.CodeSeq, events.StateFailed, stamp(v.FailedAt), failureDetail(v)
		return e, firstError(checkCommon(tenant, v.Tenant, v.ChallengeID, v.RequestID), checkCodeSeq(v.CodeSeq, 1), required("failed_at", v.FailedAt))
	case events.DispatchExpired:
		e.kind, e.requestID, e.challengeID, e.codeSeq, e.state, e.at = statusProgress, v.RequestID, v.ChallengeID, v.CodeSeq, events.StateDispatchExpired, stamp(v.ExpiredAt)
		return e, firstError(checkCommon(tenant, v.Tenant, v.ChallengeID, v.RequestID), checkCodeSeq(v.CodeSeq, 1), required("expired_at", v.ExpiredAt))
	case events.Feedback:
		at := v.OccurredAt
		if at.IsZero() {
			at = v.ReceivedAt
		}
		state, detail, err := feedbackState(v)
		e.kind, e.challengeID, e.codeSeq, e.state, e.at, e.detail = statusProgress, v.ChallengeID, v.CodeSeq, state, stamp(at), detail
		switch {
		case v.Tenant != tenant:
			return nil, &events.ValidationError{Reason: events.ReasonInvalidTenant, Field: "tenant", Detail: "differs from the subject's tenant"}
		case !events.IsUUID(v.ChallengeID):
			return nil, field("challenge_id", "must be a lowercase UUID")
		}
		return e, firstError(err, checkCodeSeq(v.CodeSeq, 1), required("occurred_at", at))
	case events.Verified:
		e.kind, e.requestID, e.challengeID, e.codeSeq, e.state, e.at = statusClosed, v.RequestID, v.ChallengeID, v.CodeSeq, events.StateVerified, stamp(v.VerifiedAt)
		return e, firstError(checkCommon(tenant, v.Tenant, v.ChallengeID, v.RequestID), checkCodeSeq(v.CodeSeq, 0), required("verified_at", v.VerifiedAt))
	case events.Locked:
		e.kind, e.requestID, e.challengeID, e.state, e.at = statusClosed, v.RequestID, v.ChallengeID, events.StateLocked, stamp(v.LockedAt)
		return e, firstError(checkCommon(tenant, v.Tenant, v.ChallengeID, v.RequestID), required("locked_at", v.LockedAt))
	case events.Superseded:
		e.kind, e.requestID, e.challengeID, e.state, e.at = statusClosed, v.RequestID, v.ChallengeID, events.StateSuperseded, stamp(v.SupersededAt)
		return e, firstError(checkCommon(tenant, v.Tenant, v.ChallengeID, v.RequestID), required("superseded_at", v.SupersededAt))
	}
	return nil, field("subject", "the status projection does not read %s", typ)
}

// invalidTenant is the subject tenant of a request refused for its tenant (the issuer's
// rejectTenant).
const invalidTenant = "_invalid"

// feedbackState maps a provider's feedback to the state of the code it was about.
func feedbackState(v events.Feedback) (events.RequestState, string, error) {
	switch v.Kind {
	case events.FeedbackMailboxDelivered:
		return events.StateMailboxDelivered, "", nil
	case events.FeedbackDelayed:
		return events.StateDelayed, clean(v.DelayType), nil
	case events.FeedbackBounced:
		detail := v.BounceType
		if v.BounceSubType != "" {
			detail += "/" + v.BounceSubType
		}
		return events.StateBounced, clean(detail), nil
	case events.FeedbackComplained:
		return events.StateComplained, clean(v.ComplaintType), nil
	case events.FeedbackRejected:
		// Never the diagnostic: the provider's text can name its account and hosts.
		return events.StateFailed, feedbackRejectedDetail, nil
	}
	return "", "", field("kind", "unknown feedback kind %q", clip(string(v.Kind), 32))
}

// feedbackRejectedDetail is the detail of a code the provider took and then refused to
// send (otp.feedback kind rejected).
const feedbackRejectedDetail = "rejected by the provider"

// failureDetail is the detail of a code the dispatcher gave up on (otp.delivery_failed):
// how it failed, "permanent" (the provider refused it) or "transient" (deliveries ran
// out while the providers kept failing), and the provider's name when it is one. Never
// the reason: SDK and SMTP errors carry account ids, resource names and relay hosts,
// which are the operator's, not the app's.
func failureDetail(v events.DeliveryFailed) string {
	d := "transient"
	if v.Permanent {
		d = "permanent"
	}
	if providerName(v.Provider) {
		d += " (" + v.Provider + ")"
	}
	return d
}

// providerName reports whether p looks like a provider's name ("ses", "smtp"), not text:
// 1 to 32 lowercase letters, digits, '-' and '_'.
func providerName(p string) bool {
	if p == "" || len(p) > 32 {
		return false
	}
	for i := 0; i < len(p); i++ {
		if c := p[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' && c != '_' {
			return false
		}
	}
	return true
}

// statusRecipientKey is the subject hash an otp.issued names its recipient by; for one of
// an earlier release, which carried the address, its hash under the verifier's active key
// (legacyRecipientKey).
func (s *Service) statusRecipientKey(tenant string, v events.Issued) (string, error) {
	key := v.RecipientHash
	if key == "" {
		var err error
		if key, err = s.legacyRecipientKey(tenant, v); err != nil || key == "" {
			return "", err
		}
	}
	return key, checkRecipientKey("recipient_hash", key)
}

func checkRecipientKey(name, h string) error {
	if h == "" || len(h) > maxRecipientHash {
		return field(name, "each must be 1 to %d bytes", maxRecipientHash)
	}
	return text(name, h)
}

func checkCodeSeq(n, least int) error {
	if n < least || n > maxCodeSeq {
		return field("code_seq", "must be from %d to %d", least, maxCodeSeq)
	}
	return nil
}

// required refuses a missing time or text.
func required[T interface{ ~string | time.Time }](name string, v T) error {
	var zero T
	if v == zero {
		return &events.ValidationError{Reason: events.ReasonMissingField, Field: name, Detail: "required"}
	}
	return nil
}

func firstError(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// stamp is t as PostgreSQL keeps it: UTC, to the microsecond. The rules compare event
// times with stored ones; they must agree on a redelivery.
func stamp(t time.Time) time.Time { return t.UTC().Truncate(time.Microsecond) }

// validRequestID: what events.DecodeStatusRequest accepts, 1 to 128 visible ASCII
// characters.
func validRequestID(s string) bool {
	if s == "" || len(s) > maxRequestID {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '!' || s[i] > '~' {
			return false
		}
	}
	return true
}

// clean makes provider and refusal text fit a detail: control characters (NUL, line
// breaks) as spaces, invalid UTF-8 dropped, at most maxStatusDetail bytes.
func clean(s string) string {
	s = strings.ToValidUTF8(s, "")
	s = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	return clip(strings.TrimSpace(s), maxStatusDetail)
}

// clip cuts s to at most n bytes on a rune boundary.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
