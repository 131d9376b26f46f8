package chaos

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/services/dispatcher/ses/sestest"
)

// Outage is how long the provider outages last: well inside a code's default lifetime
// (5 minutes), so every code can still be mailed once the providers are back.
const Outage = 20 * time.Second

// Scenarios are the whole suite, in the order `make chaos` runs them: a steady load of
// 100 requests per second, ten seconds of it before the fault, twenty after it heals.
func Scenarios() []Scenario {
	long := func(name string, f Fault) Scenario {
		return Scenario{Name: name, Rate: 100, Pre: 10 * time.Second, Post: 20 * time.Second, Settle: 3 * time.Minute, Fault: f}
	}
	var out []Scenario
	for _, s := range []string{"issuer", "dispatcher", "verifier", "auditor"} {
		sc := long("kill -9 "+s, killEach(s))
		if s == "dispatcher" {
			// SES takes each mail at once and answers 50 ms later, so the kill lands with
			// sends that SES took and the dispatcher never recorded: the window.
			sc.Name += " (SES answers 50ms after taking a mail)"
			sc.Options.SESAnswerDelay = 50 * time.Millisecond
			sc.Fault = killDispatcher
			sc.InFlight = func(e *Env) int { return e.inFlightAtKill }
		}
		out = append(out, sc)
	}
	// SES answers 50 ms after taking a mail (a real endpoint's latency), so the restart
	// lands while sends are in flight: sent, and not yet recorded.
	pgRestart := long("PostgreSQL restart (fast shutdown; SES answers in 50ms)", restartPostgres)
	pgRestart.Options.SESAnswerDelay = 50 * time.Millisecond
	diskFull := long("NATS disk full for 15s, freed (nats-server restarted if stuck)", fillNATSDisk(15*time.Second))
	diskFull.Options.NATSDisk = 512 << 20
	cluster := long("NATS cluster: kill -9 the OTP_EVENTS leader", killStreamLeader(events.StreamEvents))
	cluster.Options.NATSNodes = 3
	// The worst measured run: a dispatcher, PostgreSQL and NATS down together.
	together := long("kill -9 dispatcher, PostgreSQL fast stop, kill -9 NATS, together (SES answers in 50ms)", allDown)
	together.Options.SESAnswerDelay = 50 * time.Millisecond
	together.InFlight = func(e *Env) int { return e.inFlightAtKill }
	return append(out,
		pgRestart,
		long("NATS kill -9 and restart", killNATS),
		together,
		cluster,
		long(fmt.Sprintf("SES down %v, then up", Outage), providersDown(Outage, "ses")),
		long(fmt.Sprintf("SES and SMTP down %v", Outage), providersDown(Outage, "ses", "smtp")),
		long("SES answers in 3s for 15s", slowSES(3*time.Second, 15*time.Second)),
		long("SES hangs past its 5s timeout for 15s", hangSES(15*time.Second)),
		diskFull,
	)
}

// Short is the version `make test` runs: kill -9 of the issuer, the verifier and the
// auditor in turn under a small load. The dispatcher is left to `make chaos`: the jobs
// it had in flight come back only when their lease (the consumer's 60 s AckWait) ends,
// which alone would take the short run past its minute.
func Short() Scenario {
	return Scenario{Name: "kill -9 issuer, verifier, auditor in turn (short)", Rate: 20,
		Pre: 3 * time.Second, Post: 4 * time.Second, Settle: 50 * time.Second,
		Fault: func(e *Env, logf func(string, ...any)) (int, error) {
			for i, s := range []string{"issuer", "verifier", "auditor"} {
				if i > 0 {
					time.Sleep(time.Second) // the scenario's timeline: one kill a second
				}
				if _, err := killEach(s)(e, logf); err != nil {
					return i, err
				}
			}
			return 3, nil
		}}
}

// killEach kills service with SIGKILL and starts it again at once.
func killEach(service string) Fault {
	return func(e *Env, logf func(string, ...any)) (int, error) {
		logf("kill -9 %s", service)
		return 1, e.Restart(service)
	}
}

// killDispatcher kills the dispatcher with SIGKILL, counts the sends it had in flight
// (delivery rows it claimed and never recorded: at most its OTP_DISPATCH_CONCURRENCY),
// and starts it again.
func killDispatcher(e *Env, logf func(string, ...any)) (int, error) {
	logf("kill -9 dispatcher")
	if err := e.Procs["dispatcher"].Kill(); err != nil {
		return 1, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := e.Pool().QueryRow(ctx, `SELECT count(*) FROM dispatcher.deliveries WHERE status = 'sending'`).Scan(&e.inFlightAtKill)
	if err != nil {
		return 1, fmt.Errorf("count the sends in flight: %w", err)
	}
	logf("%d sends in flight at the kill (bound: %d)", e.inFlightAtKill, e.Concurrency)
	return 1, e.Procs["dispatcher"].Start()
}

// restartPostgres stops the cluster with a fast shutdown (sessions cut, open
// transactions rolled back) and starts it again.
func restartPostgres(e *Env, logf func(string, ...any)) (int, error) {
	logf("pg_ctl stop -m fast; pg_ctl start")
	if err := e.PG.Stop("fast"); err != nil {
		return 1, err
	}
	return 1, e.PG.Start()
}

// allDown kills the dispatcher with SIGKILL (counting the sends it had in flight), stops
// PostgreSQL with a fast shutdown and kills NATS with SIGKILL, so all three are down at
// once, then starts NATS, PostgreSQL and the dispatcher again.
func allDown(e *Env, logf func(string, ...any)) (int, error) {
	logf("kill -9 dispatcher")
	if err := e.Procs["dispatcher"].Kill(); err != nil {
		return 1, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.Pool().QueryRow(ctx, `SELECT count(*) FROM dispatcher.deliveries WHERE status = 'sending'`).Scan(&e.inFlightAtKill); err != nil {
		return 1, fmt.Errorf("count the sends in flight: %w", err)
	}
	logf("%d sends in flight at the kill (bound: %d); pg_ctl stop -m fast; kill -9 nats-server", e.inFlightAtKill, e.Concurrency)
	if err := e.PG.Stop("fast"); err != nil {
		return 2, err
	}
	s := e.NATS[0]
	if err := s.Kill(); err != nil {
		return 3, err
	}
	if err := s.Start(); err != nil {
		return 3, err
	}
	if err := WaitJetStream(s.URL(), time.Minute); err != nil {
		return 3, err
	}
	if err := e.PG.Start(); err != nil {
		return 3, err
	}
	return 3, e.Procs["dispatcher"].Start()
}

// killNATS kills the single server with SIGKILL and starts it again on its file store.
func killNATS(e *Env, logf func(string, ...any)) (int, error) {
	s := e.NATS[0]
	logf("kill -9 nats-server")
	if err := s.Kill(); err != nil {
		return 1, err
	}
	if err := s.Start(); err != nil {
		return 1, err
	}
	return 1, WaitJetStream(s.URL(), time.Minute)
}

// killStreamLeader kills the server that leads stream, waits until every stream of the
// contract has a leader among the other two, then starts the server again and waits
// until every replica is current.
func killStreamLeader(stream string) Fault {
	return func(e *Env, logf func(string, ...any)) (int, error) {
		nc, err := nats.Connect(URLs(e.NATS), nats.MaxReconnects(-1), nats.ReconnectWait(250*time.Millisecond))
		if err != nil {
			return 0, err
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			return 0, err
		}
		leader, err := StreamLeader(js, stream)
		if err != nil {
			return 0, err
		}
		var victim *NATSServer
		led := []string{}
		for _, s := range e.NATS {
			if s.Name == leader {
				victim = s
			}
		}
		for _, cfg := range events.StreamConfigs(events.StreamOptions{}) {
			if l, _ := StreamLeader(js, cfg.Name); l == leader {
				led = append(led, cfg.Name)
			}
		}
		if victim == nil {
			return 0, fmt.Errorf("leader %q is none of the servers", leader)
		}
		logf("kill -9 %s, leader of %v", leader, led)
		if err := victim.Kill(); err != nil {
			return 1, err
		}
		names := streamNames()
		if err := until(time.Minute, func() error {
			for _, n := range names {
				l, err := StreamLeader(js, n)
				if err != nil {
					return err
				}
				if l == leader {
					return fmt.Errorf("%s still led by the dead server", n)
				}
			}
			return nil
		}); err != nil {
			return 1, fmt.Errorf("new leaders: %w", err)
		}
		logf("every stream has a new leader; restarting %s", leader)
		if err := victim.Start(); err != nil {
			return 1, err
		}
		return 1, until(2*time.Minute, func() error { return StreamsCurrent(js, 3, names...) })
	}
}

func streamNames() []string {
	var names []string
	for _, cfg := range events.StreamConfigs(events.StreamOptions{}) {
		names = append(names, cfg.Name)
	}
	return names
}

// fillNATSDisk fills the single NATS server's disk for d, then frees it. If JetStream
// still refuses the app's requests ten seconds later, it restarts nats-server (SIGTERM,
// then start), as the runbook says, and counts that as a second fault.
func fillNATSDisk(d time.Duration) Fault {
	return func(e *Env, logf func(string, ...any)) (int, error) {
		logf("NATS disk full")
		if err := e.FillDisk(); err != nil {
			return 1, err
		}
		time.Sleep(d) // the fault's length
		logf("NATS disk freed")
		freed := time.Now()
		if err := e.FreeDisk(); err != nil {
			return 1, err
		}
		if until(10*time.Second, func() error {
			if e.lastAck().After(freed) {
				return nil
			}
			return errors.New("no request acknowledged since the disk was freed")
		}) == nil {
			logf("JetStream took requests again %v after the disk was freed", time.Since(freed).Round(time.Millisecond))
			return 1, nil
		}
		logf("JetStream still refuses requests 10s after the disk was freed: restarting nats-server")
		s := e.NATS[0]
		if err := s.Stop(); err != nil {
			return 2, err
		}
		if err := s.Start(); err != nil {
			return 2, err
		}
		return 2, WaitJetStream(s.URL(), time.Minute)
	}
}

// providersDown closes the ports of the named providers ("ses", "smtp") for d, then
// opens them again: connections are refused, as when a provider's endpoint is gone.
func providersDown(d time.Duration, which ...string) Fault {
	return func(e *Env, logf func(string, ...any)) (int, error) {
		wires := map[string]*Proxy{"ses": e.SESWire, "smtp": e.SMTPWire}
		for _, w := range which {
			logf("%s down", w)
			wires[w].Down()
		}
		time.Sleep(d) // the outage's length: the fault itself
		var errs []error
		for _, w := range which {
			logf("%s up", w)
			errs = append(errs, wires[w].Up())
		}
		return len(which), errors.Join(errs...)
	}
}

// slowSES makes SES take delay to answer each send, for d: slower than usual, inside
// the dispatcher's 5 s timeout, so nothing is ambiguous and nothing is sent twice.
func slowSES(delay, d time.Duration) Fault {
	return func(e *Env, logf func(string, ...any)) (int, error) {
		logf("SES answers in %v", delay)
		e.SES.SetFault(sestest.Always(sestest.Fault{Delay: delay}))
		time.Sleep(d) // the fault's length
		e.SES.SetFault(nil)
		logf("SES answers at once again")
		return 1, nil
	}
}

// hangSES lets SES take and send every mail but withholds every answer, for d: each
// send times out with its outcome unknown, the ambiguous case, which the dispatcher
// answers with exactly one deliberate re-send of the same code.
func hangSES(d time.Duration) Fault {
	return func(e *Env, logf func(string, ...any)) (int, error) {
		logf("SES answers withheld")
		e.SESWire.Hang(true)
		time.Sleep(d) // the fault's length
		e.SESWire.Hang(false)
		logf("SES answers again")
		return 1, nil
	}
}

// until polls f until it returns nil or timeout passes, returning its last error.
func until(timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}
