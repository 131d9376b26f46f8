package mailer

import (
	"context"
	"errors"
	"fmt"
)

// Result is the outcome of a Chain send. Each provider call, retries inside a guard
// included, is seen by the provider wrapper of whoever builds the chain (the dispatcher
// logs every call for its delivery events); the chain reports only who accepted.
type Result struct {
	Provider string // who accepted the message; empty on failure
	Receipt  Receipt
}

// Chain tries providers in order until one accepts the message.
type Chain struct {
	Providers []Provider
}

// Send tries each provider in turn. It stops at the first acceptance, at a permanent
// failure (another provider would refuse the same message), and at an ambiguous one
// (the first provider may have delivered it; sending again is a decision for the caller).
// On failure the error is the last provider's *SendError.
func (c *Chain) Send(ctx context.Context, m *Message) (Result, error) {
	var res Result
	if len(c.Providers) == 0 {
		return res, &SendError{Provider: "chain", Class: ProviderDown, Err: errors.New("no provider configured")}
	}
	var last error
	for _, p := range c.Providers {
		rcpt, err := p.Send(ctx, m)
		if err == nil {
			res.Provider, res.Receipt = p.Name(), rcpt
			return res, nil
		}
		err = asSendError(p.Name(), err)
		last = err
		switch ClassOf(err) {
		case Permanent, Ambiguous:
			return res, err
		}
		if ctx.Err() != nil {
			break
		}
	}
	return res, fmt.Errorf("every provider failed: %w", last)
}
