package auditor

import (
	"bytes"
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// anchorState is what the checkpoint loop knows: the head this process last wrote and the
// head it last signed. An auditor signs only heads it wrote itself, never the head the
// database claims, so a rewound chain_head is not signed into the anchor.
type anchorState struct {
	mu        sync.Mutex
	head      Head
	signed    Head
	sinceLast int
	rows      int           // CheckpointRows
	full      chan struct{} // rows reached

	checkpoints prometheus.Counter
	verifyOK    prometheus.Gauge
	verifyLast  prometheus.Gauge
}

func newAnchorState(cfg *Config, reg prometheus.Registerer) *anchorState {
	if cfg.CheckpointEvery <= 0 {
		cfg.CheckpointEvery = 10 * time.Second
	}
	if cfg.CheckpointRows <= 0 {
		cfg.CheckpointRows = 1000
	}
	if cfg.VerifyEvery <= 0 {
		cfg.VerifyEvery = 10 * time.Minute
	}
	a := &anchorState{rows: cfg.CheckpointRows, full: make(chan struct{}, 1),
		checkpoints: prometheus.NewCounter(prometheus.CounterOpts{Name: "otpflow_audit_checkpoints_total",
			Help: "Signed checkpoints of the audit chain published to OTP_AUDIT."}),
		verifyOK: prometheus.NewGauge(prometheus.GaugeOpts{Name: "otpflow_audit_verify_ok",
			Help: "1 when the last scheduled audit verification found the log intact, 0 when it found it broken or could not run."}),
		verifyLast: prometheus.NewGauge(prometheus.GaugeOpts{Name: "otpflow_audit_verify_last_success_timestamp_seconds",
			Help: "When a scheduled audit verification last found the log intact."}),
	}
	if reg != nil {
		reg.MustRegister(a.checkpoints, a.verifyOK, a.verifyLast)
	}
	return a
}

// wrote records the head of a committed Append.
func (a *anchorState) wrote(w Written) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.head = w.Head
	a.sinceLast += w.Rows
	if a.sinceLast >= a.rows {
		select {
		case a.full <- struct{}{}:
		default:
		}
	}
}

// pending returns the head to sign, if it moved since the last checkpoint.
func (a *anchorState) pending() (Head, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.head.Pos == 0 || (a.head.Pos == a.signed.Pos && bytes.Equal(a.head.Hash, a.signed.Hash)) {
		return Head{}, false
	}
	return a.head, true
}

func (a *anchorState) signedHead(h Head) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.signed = h
	a.sinceLast = 0
}

// runAnchor publishes checkpoints and runs the scheduled verification until ctx ends, then
// publishes the last head once more.
func (s *Service) runAnchor(ctx context.Context) {
	if s.cfg.Signer == nil {
		<-ctx.Done()
		return
	}
	a := s.anchor
	tick := time.NewTicker(s.cfg.CheckpointEvery)
	defer tick.Stop()
	verify := time.NewTicker(s.cfg.VerifyEvery)
	defer verify.Stop()
	checkpoint := func(ctx context.Context) {
		h, ok := a.pending()
		if !ok {
			return
		}
		if err := PublishCheckpoint(ctx, s.js, s.cfg.Signer, h); err != nil {
			s.log.Warn("publish audit checkpoint", "pos", h.Pos, "err", err)
			return
		}
		a.checkpoints.Inc()
		a.signedHead(h)
	}
	for {
		select {
		case <-ctx.Done():
			final, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			checkpoint(final)
			cancel()
			return
		case <-tick.C:
			checkpoint(ctx)
		case <-a.full:
			checkpoint(ctx)
		case <-verify.C:
			s.verifyNow(ctx)
		}
	}
}

// verifyNow runs VerifyAnchored and exports its result.
func (s *Service) verifyNow(ctx context.Context) {
	rep, err := s.cfg.Chain.VerifyAnchored(ctx, s.pool, Anchors{JS: s.js, PublicKeys: s.cfg.Signer.PublicKeys()})
	switch {
	case err != nil:
		if ctx.Err() == nil {
			s.log.Warn("scheduled audit verification", "err", err)
			s.anchor.verifyOK.Set(0)
		}
	case !rep.OK():
		s.log.Error("audit log BROKEN", "chain_pos", rep.BrokenPos, "stream_seq", rep.BrokenSeq, "problem", rep.Problem)
		s.anchor.verifyOK.Set(0)
	default:
		s.anchor.verifyOK.Set(1)
		s.anchor.verifyLast.SetToCurrentTime()
	}
}
