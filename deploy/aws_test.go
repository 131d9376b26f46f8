package deploy

import (
	"encoding/json"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// iamPolicy is an IAM policy document. It is decoded strictly: an element the checks do
// not read (NotAction, NotResource, NotPrincipal, which turn a grant inside out) fails the
// check rather than pass unseen. Action, Resource and a condition's values may each be a
// string or a list; Principal is "*" or a map.
type iamPolicy struct {
	Version   string
	Statement []iamStatement
}

type iamStatement struct {
	Sid       string
	Effect    string
	Principal principal
	Action    stringList
	Resource  stringList
	Condition map[string]map[string]stringList
}

// principal is a statement's Principal: Any for "*", else by kind ("Service", "AWS").
type principal struct {
	Any   bool
	Kinds map[string]stringList
}

func (p *principal) UnmarshalJSON(b []byte) error {
	var s string
	if json.Unmarshal(b, &s) == nil {
		if s != "*" {
			return fmt.Errorf("principal %q", s)
		}
		p.Any = true
		return nil
	}
	return json.Unmarshal(b, &p.Kinds)
}

func parsePolicy(text string) (iamPolicy, error) {
	var p iamPolicy
	dec := json.NewDecoder(strings.NewReader(text))
	dec.DisallowUnknownFields()
	err := dec.Decode(&p)
	return p, err
}

type stringList []string

func (l *stringList) UnmarshalJSON(b []byte) error {
	var one string
	if json.Unmarshal(b, &one) == nil {
		*l = stringList{one}
		return nil
	}
	return json.Unmarshal(b, (*[]string)(l))
}

// feedbackEventTypes are the SES event types the dispatcher turns into otp.feedback
// (services/dispatcher/sesfeedback): the configuration set must publish each of them.
var feedbackEventTypes = []string{"BOUNCE", "COMPLAINT", "DELIVERY", "DELIVERY_DELAY", "REJECT", "RENDERING_FAILURE"}

func TestAWS(t *testing.T) { report(t, checkAWS(loadFiles(t))) }

// checkAWS checks deploy/aws against the dispatcher's manifest: the dispatcher's IAM
// policy grants exactly sending through its configuration set and reading and deleting
// on its feedback queue, nothing with a wildcard; only the feedback topic may write to
// the queue; and the configuration set publishes every event type otpflow reads to that
// topic.
func checkAWS(f files) []error {
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, errorf(format, args...)) }
	env := func(name string) string {
		m := regexp.MustCompile(`- name: ` + name + `\n\s+value: (\S+)`).FindStringSubmatch(f["k8s/dispatcher.yaml"])
		if m == nil {
			fail("k8s/dispatcher.yaml: %s is not set", name)
			return ""
		}
		return m[1]
	}
	region, configSet, queueURL := env("OTP_SES_REGION"), env("OTP_SES_CONFIGURATION_SET"), env("OTP_SES_FEEDBACK_QUEUE_URL")
	u, err := url.Parse(queueURL)
	parts := strings.Split(strings.Trim(u.Path, "/"), "/")
	if err != nil || u.Scheme != "https" || u.Host != "sqs."+region+".amazonaws.com" || len(parts) != 2 {
		fail("k8s/dispatcher.yaml: OTP_SES_FEEDBACK_QUEUE_URL %q is not https://sqs.%s.amazonaws.com/<account>/<queue>", queueURL, region)
		return errs
	}
	account, queue := parts[0], parts[1]
	queueARN := fmt.Sprintf("arn:aws:sqs:%s:%s:%s", region, account, queue)

	var dest struct {
		ConfigurationSetName string
		EventDestination     struct {
			Enabled            bool
			MatchingEventTypes []string
			SnsDestination     struct{ TopicArn string }
		}
	}
	if err := json.Unmarshal([]byte(f["aws/ses-event-destination.json"]), &dest); err != nil {
		fail("aws/ses-event-destination.json: %v", err)
	}
	topicARN := dest.EventDestination.SnsDestination.TopicArn
	types := slices.Sorted(slices.Values(dest.EventDestination.MatchingEventTypes))
	switch {
	case dest.ConfigurationSetName != configSet:
		fail("aws/ses-event-destination.json: configuration set %q, the dispatcher sends through %q", dest.ConfigurationSetName, configSet)
	case !dest.EventDestination.Enabled:
		fail("aws/ses-event-destination.json: the destination is not enabled")
	case !slices.Equal(types, feedbackEventTypes):
		fail("aws/ses-event-destination.json: event types %v, want %v", types, feedbackEventTypes)
	case !strings.HasPrefix(topicARN, fmt.Sprintf("arn:aws:sns:%s:%s:", region, account)):
		fail("aws/ses-event-destination.json: topic %q is not in %s of %s", topicARN, region, account)
	case env("OTP_SES_FEEDBACK_TOPIC_ARN") != topicARN:
		fail("k8s/dispatcher.yaml: OTP_SES_FEEDBACK_TOPIC_ARN is not the event destination's topic %s: every signed notification would be refused", topicARN)
	}

	policy := func(name string) iamPolicy {
		p, err := parsePolicy(f[name])
		if err != nil {
			fail("%s: %v", name, err)
		}
		if p.Version != "2012-10-17" {
			fail("%s: Version %q", name, p.Version)
		}
		for _, s := range p.Statement {
			if s.Effect != "Allow" && s.Effect != "Deny" {
				fail("%s: %s: Effect %q", name, s.Sid, s.Effect)
			}
			if s.Effect == "Allow" && s.Principal.Any {
				fail("%s: %s: allows any principal", name, s.Sid)
			}
			for _, v := range append(slices.Clone(s.Action), s.Resource...) {
				if strings.Contains(v, "*") {
					fail("%s: %s: %q is a wildcard", name, s.Sid, v)
				}
			}
		}
		return p
	}
	// statement finds the statement of effect on action alone.
	statement := func(name string, p iamPolicy, effect, action string) *iamStatement {
		for i, s := range p.Statement {
			if s.Effect == effect && slices.Equal(s.Action, stringList{action}) {
				return &p.Statement[i]
			}
		}
		fail("%s: no %s statement on %s", name, effect, action)
		return nil
	}

	grants := map[string][]string{} // action → resources
	for _, s := range policy("aws/dispatcher-policy.json").Statement {
		for _, a := range s.Action {
			grants[a] = append(grants[a], s.Resource...)
		}
	}
	if actions := slices.Sorted(func(yield func(string) bool) {
		for a := range grants {
			if !yield(a) {
				return
			}
		}
	}); !slices.Equal(actions, []string{"ses:SendEmail", "sqs:DeleteMessage", "sqs:ReceiveMessage"}) {
		fail("aws/dispatcher-policy.json: actions %v, want ses:SendEmail, sqs:ReceiveMessage and sqs:DeleteMessage alone", actions)
	}
	for _, a := range []string{"sqs:ReceiveMessage", "sqs:DeleteMessage"} {
		if !slices.Equal(grants[a], []string{queueARN}) {
			fail("aws/dispatcher-policy.json: %s on %v, want the feedback queue %s alone", a, grants[a], queueARN)
		}
	}
	configSetARN := fmt.Sprintf("arn:aws:ses:%s:%s:configuration-set/%s", region, account, configSet)
	from := regexp.MustCompile(`- name: OTP_MAIL_FROM\n\s+value: .*@([a-z0-9.-]+)>`).FindStringSubmatch(f["k8s/dispatcher.yaml"])
	if from == nil {
		fail("k8s/dispatcher.yaml: OTP_MAIL_FROM names no sending domain")
		return errs
	}
	if got, want := slices.Sorted(slices.Values(grants["ses:SendEmail"])),
		[]string{configSetARN, fmt.Sprintf("arn:aws:ses:%s:%s:identity/%s", region, account, from[1])}; !slices.Equal(got, want) {
		fail("aws/dispatcher-policy.json: ses:SendEmail on %v, want the sending identity and the configuration set alone %v", got, want)
	}

	// The queue: the topic may write to it, and nobody else, even a principal of the
	// account whose own policy allows sqs:SendMessage (a queue policy only adds grants;
	// the Deny is what takes them away).
	const queuePolicy = "aws/feedback-queue-policy.json"
	q := policy(queuePolicy)
	if len(q.Statement) != 2 {
		fail("%s: %d statements, want the topic's Allow and everyone else's Deny", queuePolicy, len(q.Statement))
	}
	if s := statement(queuePolicy, q, "Allow", "sqs:SendMessage"); s != nil {
		switch {
		case !slices.Equal(s.Resource, stringList{queueARN}):
			fail("%s: Allow on %v, want %s", queuePolicy, s.Resource, queueARN)
		case len(s.Principal.Kinds) != 1 || !slices.Equal(s.Principal.Kinds["Service"], stringList{"sns.amazonaws.com"}):
			fail("%s: Allow to %v, want the SNS service alone", queuePolicy, s.Principal)
		case !slices.Equal(s.Condition["ArnEquals"]["aws:SourceArn"], stringList{topicARN}):
			fail("%s: no aws:SourceArn condition on the feedback topic %s: any topic could write feedback", queuePolicy, topicARN)
		}
	}
	if s := statement(queuePolicy, q, "Deny", "sqs:SendMessage"); s != nil &&
		(!s.Principal.Any || !slices.Equal(s.Resource, stringList{queueARN}) || !slices.Equal(s.Condition["ArnNotEquals"]["aws:SourceArn"], stringList{topicARN})) {
		fail("%s: the Deny must cover every principal whose aws:SourceArn is not the topic %s", queuePolicy, topicARN)
	}

	// The topic: SES of this account, from the configuration set, publishes; nobody else;
	// and only the queue subscribes, so no other reader sees the notifications.
	const topicPolicy = "aws/sns-topic-policy.json"
	tp := policy(topicPolicy)
	if len(tp.Statement) != 3 {
		fail("%s: %d statements, want SES's Allow and the two Denies", topicPolicy, len(tp.Statement))
	}
	if s := statement(topicPolicy, tp, "Allow", "sns:Publish"); s != nil {
		switch {
		case !slices.Equal(s.Resource, stringList{topicARN}):
			fail("%s: Allow on %v, want %s", topicPolicy, s.Resource, topicARN)
		case len(s.Principal.Kinds) != 1 || !slices.Equal(s.Principal.Kinds["Service"], stringList{"ses.amazonaws.com"}):
			fail("%s: Allow to %v, want the SES service alone", topicPolicy, s.Principal)
		case !slices.Equal(s.Condition["StringEquals"]["aws:SourceAccount"], stringList{account}) ||
			!slices.Equal(s.Condition["ArnEquals"]["aws:SourceArn"], stringList{configSetARN}):
			fail("%s: SES may publish for another account or configuration set: want aws:SourceAccount %s and aws:SourceArn %s", topicPolicy, account, configSetARN)
		}
	}
	if s := statement(topicPolicy, tp, "Deny", "sns:Publish"); s != nil &&
		(!s.Principal.Any || !slices.Equal(s.Resource, stringList{topicARN}) || !slices.Equal(s.Condition["ArnNotEquals"]["aws:SourceArn"], stringList{configSetARN})) {
		fail("%s: the Deny of sns:Publish must cover every principal whose aws:SourceArn is not %s", topicPolicy, configSetARN)
	}
	if s := statement(topicPolicy, tp, "Deny", "sns:Subscribe"); s != nil &&
		(!s.Principal.Any || !slices.Equal(s.Resource, stringList{topicARN}) || !slices.Equal(s.Condition["StringNotEquals"]["sns:Endpoint"], stringList{queueARN})) {
		fail("%s: the Deny of sns:Subscribe must cover every endpoint but the queue %s", topicPolicy, queueARN)
	}
	return errs
}
