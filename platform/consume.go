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
// written in one database transaction. On cancel it stops pulling, finishes the messages
// it already holds and returns.
func ConsumeBatches(ctx context.Context, cons jetstream.Consumer, size int, handle BatchHandler) error {
	if size < 1 {
		size = 1
	}
	// Room for everything Consume may have pulled while a batch is in hand, so the
	// delivery callback (which also sees heartbeats) does not block.
	buf := make(chan jetstream.Msg, 4*size+1)
	cc, err := cons.Consume(func(m jetstream.Msg) { buf <- m },
		jetstream.PullMaxMessages(2*size),
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
