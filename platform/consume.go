package platform

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// BatchHandler handles one batch of messages and settles each one (ack, nak or term). It
// runs with a context that is not cancelled by shutdown, so the batch in hand finishes.
type BatchHandler func(ctx context.Context, batch []jetstream.Msg)

// ConsumeBatches pulls from cons and hands the handler batches of up to size messages:
// the first waiting message plus whatever else has already arrived, so a quiet stream
// gets batches of one with no added latency and a busy one gets full batches, each
// written in one database transaction. At most 2×size messages are pulled ahead. On
// cancel it stops pulling, finishes the messages it already holds and returns.
func ConsumeBatches(ctx context.Context, cons jetstream.Consumer, size int, handle BatchHandler) error {
	return ConsumePrefetch(ctx, cons, size, 2*size, handle)
}

// ConsumePrefetch is ConsumeBatches with at most prefetch messages pulled ahead of the
// handler. Pulled messages wait with their AckWait running, so a consumer whose handler
// can be slow keeps prefetch small.
func ConsumePrefetch(ctx context.Context, cons jetstream.Consumer, size, prefetch int, handle BatchHandler) error {
	size, prefetch = max(size, 1), max(prefetch, 1)
	// Room for everything Consume may have pulled while a batch is in hand, so the
	// delivery callback (which also sees heartbeats) does not block.
	buf := make(chan jetstream.Msg, 2*prefetch+1)
	cc, err := cons.Consume(func(m jetstream.Msg) { buf <- m },
		jetstream.PullMaxMessages(prefetch),
		jetstream.PullExpiry(5*time.Second),
	)
	if err != nil {
		return fmt.Errorf("consume: %w", err)
	}
	work := context.WithoutCancel(ctx)
	batch := make([]jetstream.Msg, 0, size)
	flush := func() {
		if len(batch) > 0 {
			handle(work, batch)
			batch = batch[:0]
		}
	}
	collect := func(first jetstream.Msg) {
		batch = append(batch, first)
		for len(batch) < size {
			select {
			case m := <-buf:
				batch = append(batch, m)
			default:
				return
			}
		}
	}
	done := ctx.Done()
	for {
		select {
		case <-done:
			cc.Drain() // buffered messages are still delivered to buf
			done = nil
		case <-cc.Closed():
			for {
				select {
				case m := <-buf:
					collect(m)
					flush()
				default:
					return nil
				}
			}
		case m := <-buf:
			collect(m)
			flush()
		}
	}
}
