package verifier

import (
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// The status projection: what became of each request, for otp.status.<tenant>. It reads
// OTP_EVENTS through the durable verifier-status (events.VerifierStatusConsumer) into
// verifier.request_status, one row per (tenant, request_id): the request's challenge,
// its latest code and the state that code reached.
//
// The rules below decide a row from the row and one event, and do not depend on the order
// the events are applied in beyond what the stream itself orders (an erasure after the
// issuance it erases): replicas share the durable, so two batches can commit in either
// order, and a delivery can be projected before the issuance it follows.
//   - A code's state only moves forward: pending < sent < delayed < mailbox_delivered <
//     {bounced, complained, failed, dispatch_expired} < {verified, locked, superseded}
//     (stateRank). Of two events of one rank the later one is the code's state; at one
//     time, the one stateTie puts first (progressWins). A newer code of the challenge (a
//     resend) starts over at its own state; an event of an older code changes nothing.
//   - Verified, locked and superseded close the challenge: nothing after changes the
//     state. Of two closes the earlier one is what happened (at one time, by stateTie).
//   - A refusal (otp.rejected) makes the row only when the request has none: a request
//     refused and never issued. Beside a challenge it is the last refusal, reported with
//     the state, never instead of it; a refusal from before the current code was issued
//     (refused as rate_limited, then issued when retried) is not reported at all.
//   - otp.erasure_requested deletes the person's rows, found by the subject hash
//     otp.issued carried, and remembers their challenges so that none of their later
//     events makes the row again.
//   - Every event that names a request can make its row; feedback names only its
//     challenge, so feedback about a challenge no row holds yet is delivered again for
//     about five minutes (the issuance and delivery before it may be in another replica's
//     batch, or in one that failed) and then dropped (statusOrphanDeliveries).

// statusKind is what an event does to a request's row.
type statusKind uint8

const (
	// statusIssued: a code of a challenge was issued (otp.issued).
	statusIssued statusKind = iota + 1
	// statusRejected: a request was refused (otp.rejected).
	statusRejected
	// statusProgress: what happened to a code's mail (otp.delivered, otp.delivery_failed,
	// otp.dispatch_expired, otp.feedback).
	statusProgress
	// statusClosed: the challenge was verified, locked or superseded.
	statusClosed
	// statusErasure: a person was erased (otp.erasure_requested).
	statusErasure
)

// statusEvent is one event of a batch, checked and ready to apply.
type statusEvent struct {
	msg    *platform.Delivery
	tenant string
	kind   statusKind
	// requestID is empty for feedback, which names only its challenge.
	requestID, challengeID string
	codeSeq                int
	// state is the state a progress or close event reaches, at at.
	state  events.RequestState
	at     time.Time
	detail string
	// expiresAt and recipientKey come with an issuance.
	expiresAt    time.Time
	recipientKey string
	// reason comes with a refusal.
	reason events.RejectReason
	// hashes are the subject hashes of an erased person.
	hashes []string
	// skip: nothing to project (a refusal of a request without a usable request id);
	// acknowledged.
	skip bool
	// refused is set when the projection refuses the event while applying it (it names
	// a challenge another request holds): it is dead-lettered, the batch goes on.
	refused error
	// orphan is set for feedback about a challenge no row holds: the events before it
	// may still be in another replica's hands (projectStatus retries it a few times).
	orphan bool
}

// statusRow is a request's row of verifier.request_status. Times are UTC, to the
// microsecond (what PostgreSQL keeps); a zero time is unknown (NULL).
type statusRow struct {
	tenant, requestID string
	// challengeID is empty for a refused request (state rejected).
	challengeID  string
	recipientKey string
	codeSeq      int
	state        events.RequestState
	stateAt      time.Time
	detail       string
	reason       events.RejectReason
	// issuedAt and expiresAt are those of code codeSeq, once its otp.issued was projected.
	issuedAt, expiresAt time.Time
	// refusal* is the last refused request beside the challenge (reason empty: none).
	refusalReason events.RejectReason
	refusalDetail string
	refusalAt     time.Time
}

// same reports whether r and o hold the same values.
func (r *statusRow) same(o *statusRow) bool {
	return r.tenant == o.tenant && r.requestID == o.requestID && r.challengeID == o.challengeID &&
		r.recipientKey == o.recipientKey && r.codeSeq == o.codeSeq && r.state == o.state && r.stateAt.Equal(o.stateAt) &&
		r.detail == o.detail && r.reason == o.reason && r.issuedAt.Equal(o.issuedAt) && r.expiresAt.Equal(o.expiresAt) &&
		r.refusalReason == o.refusalReason && r.refusalDetail == o.refusalDetail && r.refusalAt.Equal(o.refusalAt)
}

// stateRank orders the states of one code: a state moves only to a higher rank.
func stateRank(s events.RequestState) int {
	switch s {
	case events.StatePending:
		return 1
	case events.StateSent:
		return 2
	case events.StateDelayed:
		return 3
	case events.StateMailboxDelivered:
		return 4
	case events.StateBounced, events.StateComplained, events.StateFailed, events.StateDispatchExpired:
		return 5
	case events.StateVerified, events.StateLocked, events.StateSuperseded:
		return 6
	}
	return 0
}

func isClosed(s events.RequestState) bool { return stateRank(s) == 6 }

// stateTie orders the states of one rank reached at the same time, so that which of two
// such events commits first does not decide the row (replicas commit batches in either
// order): the outcome that tells the app more wins, a bounce over a complaint over a
// failure to hand the mail over over a dispatch that ran out of time; of two closes,
// verified over locked over superseded.
func stateTie(s events.RequestState) int {
	switch s {
	case events.StateDispatchExpired, events.StateSuperseded:
		return 1
	case events.StateFailed, events.StateLocked:
		return 2
	case events.StateComplained, events.StateVerified:
		return 3
	case events.StateBounced:
		return 4
	}
	return 0
}

// progressWins reports whether progress event e of the row's code replaces the row's
// state: a higher rank; of the same rank (two outcomes of the mail, or two bounces) the
// later event; at the same time the state stateTie puts first, then the greater detail.
// Every order of a code's events ends in the same state, and the event the row holds
// changes nothing when it comes again.
func progressWins(r *statusRow, e *statusEvent) bool {
	if a, b := stateRank(e.state), stateRank(r.state); a != b {
		return a > b
	}
	if !e.at.Equal(r.stateAt) {
		return e.at.After(r.stateAt)
	}
	if a, b := stateTie(e.state), stateTie(r.state); a != b {
		return a > b
	}
	return e.detail > r.detail
}

// dropRefusalBefore forgets a refusal made before t: it was of an earlier attempt, not
// beside the code issued at t.
func (r *statusRow) dropRefusalBefore(t time.Time) {
	if r.refusalReason != "" && r.refusalAt.Before(t) {
		r.refusalReason, r.refusalDetail, r.refusalAt = "", "", time.Time{}
	}
}

// challengeRow is the row a challenge event makes for a request that has none (or only a
// refusal, old, which the new row keeps as its last refusal when it came after e).
func challengeRow(prev *statusRow, e *statusEvent) *statusRow {
	n := &statusRow{tenant: e.tenant, requestID: e.requestID, challengeID: e.challengeID, codeSeq: e.codeSeq,
		state: e.state, stateAt: e.at, detail: e.detail}
	if e.kind == statusIssued {
		n.state, n.detail, n.recipientKey, n.issuedAt, n.expiresAt = events.StatePending, "", e.recipientKey, e.at, e.expiresAt
	}
	if prev != nil && prev.challengeID == "" && prev.stateAt.After(e.at) {
		n.refusalReason, n.refusalDetail, n.refusalAt = prev.reason, prev.detail, prev.stateAt
	}
	return n
}

// applyStatus returns what r (nil: the request has no row) becomes after e; nil means
// no row. It never changes r.
func applyStatus(r *statusRow, e *statusEvent) *statusRow {
	switch e.kind {
	case statusRejected:
		return applyRejected(r, e)
	case statusIssued, statusProgress, statusClosed:
	default:
		return r
	}
	if r == nil || r.challengeID == "" {
		if e.requestID == "" { // feedback names no request: nothing to make a row of
			return r
		}
		return challengeRow(r, e)
	}
	if r.challengeID != e.challengeID {
		// Another challenge under the same request id (the request id used again after
		// the issuer forgot the first): the later issuance takes the row.
		if e.kind == statusIssued && (r.issuedAt.IsZero() || e.at.After(r.issuedAt)) {
			return challengeRow(nil, e)
		}
		return r
	}
	n := *r
	switch e.kind {
	case statusIssued:
		if n.recipientKey == "" {
			n.recipientKey = e.recipientKey
		}
		switch {
		case isClosed(n.state):
			// Closed for good; what the code was is still worth showing.
			if e.codeSeq >= n.codeSeq {
				n.codeSeq, n.issuedAt, n.expiresAt = e.codeSeq, e.at, e.expiresAt
			}
		case e.codeSeq > n.codeSeq: // a resend: the new code starts over
			n.codeSeq, n.state, n.stateAt, n.detail, n.issuedAt, n.expiresAt = e.codeSeq, events.StatePending, e.at, "", e.at, e.expiresAt
			n.dropRefusalBefore(e.at)
		case e.codeSeq == n.codeSeq && n.issuedAt.IsZero(): // its delivery came first
			n.issuedAt, n.expiresAt = e.at, e.expiresAt
			n.dropRefusalBefore(e.at)
		}
	case statusProgress:
		switch {
		case isClosed(n.state) || e.codeSeq < n.codeSeq:
		case e.codeSeq > n.codeSeq: // a newer code whose otp.issued is still to come
			n.codeSeq, n.state, n.stateAt, n.detail, n.issuedAt, n.expiresAt = e.codeSeq, e.state, e.at, e.detail, time.Time{}, time.Time{}
		case progressWins(&n, e):
			n.state, n.stateAt, n.detail = e.state, e.at, e.detail
		}
	case statusClosed:
		if !isClosed(n.state) || e.at.Before(n.stateAt) || (e.at.Equal(n.stateAt) && stateTie(e.state) > stateTie(n.state)) {
			n.state, n.stateAt, n.detail = e.state, e.at, ""
		}
		n.codeSeq = max(n.codeSeq, e.codeSeq)
	}
	return &n
}

// applyRejected: a refusal makes the row of a request that has none, replaces an earlier
// refusal, and is the last refusal beside a challenge issued before it.
func applyRejected(r *statusRow, e *statusEvent) *statusRow {
	rejected := &statusRow{tenant: e.tenant, requestID: e.requestID, state: events.StateRejected, stateAt: e.at,
		reason: e.reason, detail: e.detail}
	switch {
	case r == nil:
		return rejected
	case r.challengeID == "":
		if e.at.After(r.stateAt) {
			return rejected
		}
		return r
	case !r.issuedAt.IsZero() && e.at.Before(r.issuedAt):
		return r // refused before the current code was issued: not beside it
	case r.refusalReason == "" || e.at.After(r.refusalAt):
		n := *r
		n.refusalReason, n.refusalDetail, n.refusalAt = e.reason, e.detail, e.at
		return &n
	}
	return r
}

// statusAnswer is the reply for row r at the database's now: an open state whose code
// expired is answered expired, at its expiry.
func statusAnswer(r *statusRow, now time.Time) events.StatusReply {
	reply := events.StatusReply{RequestID: r.requestID, Found: true, State: r.state, At: r.stateAt,
		Detail: r.detail, CodeSeq: r.codeSeq, ExpiresAt: r.expiresAt}
	switch r.state {
	case events.StateRejected:
		reply.Reason = r.reason
	case events.StatePending, events.StateSent, events.StateDelayed, events.StateMailboxDelivered:
		if !r.expiresAt.IsZero() && !now.Before(r.expiresAt) {
			reply.State, reply.At, reply.Detail = events.StateExpired, r.expiresAt, ""
		}
	}
	if r.refusalReason != "" {
		reply.LastRefusal = &events.StatusRefusal{Reason: r.refusalReason, Detail: r.refusalDetail, At: r.refusalAt}
	}
	return reply
}
