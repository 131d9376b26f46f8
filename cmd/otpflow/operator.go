package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/user"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// Operators are audited too: every operator command that changes state publishes one
// otp.operator_action event after acting, naming what it did and who ran it, and the
// auditor chains it like any event. The command connects to NATS before it acts, so an
// unreachable server stops it with nothing done; a publish that fails after the action
// makes it exit non-zero saying so.

// systemTenant is the tenant token of an action that is not scoped to one tenant.
const systemTenant = "_system"

// userInfoSubject answers a connection with the user and account the server
// authenticated it as (NATS server 2.10 and later, with the system account enabled).
const userInfoSubject = "$SYS.REQ.USER.INFO"

// operatorIdentity is who runs this command: the OS user, the host, and the NATS user the
// server authenticated nc as, when it names one (an anonymous connection has none).
func operatorIdentity(ctx context.Context, nc *nats.Conn) events.OperatorIdentity {
	id := events.OperatorIdentity{User: "unknown", Host: "unknown", NATSUser: natsUser(ctx, nc)}
	if u, err := user.Current(); err == nil {
		id.User = u.Username
	}
	if h, err := os.Hostname(); err == nil && h != "" {
		id.Host = h
	}
	return id
}

// natsUser asks the server which user nc is connected as: the user's name tag when its
// JWT has one, else the user (a name, or the public nkey). Empty when the server does
// not say within a second, e.g. without a system account.
func natsUser(ctx context.Context, nc *nats.Conn) string {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	m, err := nc.RequestWithContext(ctx, userInfoSubject, nil)
	if err != nil {
		return ""
	}
	var reply struct {
		Data struct {
			User     string `json:"user"`
			UserName string `json:"user_name"`
		} `json:"data"`
	}
	if json.Unmarshal(m.Data, &reply) != nil {
		return ""
	}
	if reply.Data.UserName != "" {
		return reply.Data.UserName
	}
	return reply.Data.User
}

// publishOperatorAction publishes otp.operator_action.<tenant> for an action that was done.
// detail must hold no personal data.
func publishOperatorAction(ctx context.Context, js jetstream.JetStream, action, tenant, detail string) error {
	_, err := publishOperatorActionAs(ctx, js, "operator_action:"+randomHex(12), events.OperatorAction{Action: action, Tenant: tenant, Detail: detail})
	return err
}

// publishOperatorActionAs publishes ev, with who runs this command and the time filled
// in, under message id id, and returns JetStream's acknowledgement.
func publishOperatorActionAs(ctx context.Context, js jetstream.JetStream, id string, ev events.OperatorAction) (*jetstream.PubAck, error) {
	ev.Identity, ev.At = operatorIdentity(ctx, js.Conn()), time.Now().UTC()
	msg, err := events.NewMsg(events.TypeOperatorAction, ev.Tenant, id, "", ev, events.Envelope{Source: "otpflow/cli", Time: ev.At})
	if err != nil {
		return nil, err
	}
	if ev.Redrive != nil {
		msg.Header.Set(events.HeaderRedriveOf, ev.Redrive.EventID)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ack, err := js.PublishMsg(ctx, msg)
	if err != nil {
		return nil, fmt.Errorf("publish %s: %w", events.TypeOperatorAction, err)
	}
	return ack, nil
}

// notAudited is the error of an operator command whose action was done but whose
// otp.operator_action event could not be published.
func notAudited(action, outcome string, err error) error {
	return fmt.Errorf("%s was done (%s) but NOT audited: %w; record it by hand", action, outcome, err)
}
