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

// iamPolicy is an IAM policy document, as far as the checks read it. Action, Resource and
// a condition's values may each be a string or a list.
type iamPolicy struct {
	Version   string
	Statement []struct {
		Sid       string
		Effect    string
		Principal map[string]stringList
		Action    stringList
		Resource  stringList
		Condition map[string]map[string]stringList
	}
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
	}

	policy := func(name string) iamPolicy {
		var p iamPolicy
		if err := json.Unmarshal([]byte(f[name]), &p); err != nil {
			fail("%s: %v", name, err)
		}
		if p.Version != "2012-10-17" {
			fail("%s: Version %q", name, p.Version)
		}
		for _, s := range p.Statement {
			if s.Effect != "Allow" {
				fail("%s: %s: Effect %q", name, s.Sid, s.Effect)
			}
			for _, v := range append(slices.Clone(s.Action), s.Resource...) {
				if strings.Contains(v, "*") {
					fail("%s: %s: %q is a wildcard", name, s.Sid, v)
				}
			}
		}
		return p
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
	if want := fmt.Sprintf("arn:aws:ses:%s:%s:configuration-set/%s", region, account, configSet); !slices.Contains(grants["ses:SendEmail"], want) {
		fail("aws/dispatcher-policy.json: ses:SendEmail does not name the configuration set %s", want)
	}

	q := policy("aws/feedback-queue-policy.json")
	if len(q.Statement) != 1 {
		fail("aws/feedback-queue-policy.json: %d statements, want the topic's alone", len(q.Statement))
		return errs
	}
	s := q.Statement[0]
	switch {
	case !slices.Equal(s.Action, stringList{"sqs:SendMessage"}):
		fail("aws/feedback-queue-policy.json: actions %v, want sqs:SendMessage alone", s.Action)
	case !slices.Equal(s.Resource, stringList{queueARN}):
		fail("aws/feedback-queue-policy.json: resource %v, want %s", s.Resource, queueARN)
	case !slices.Equal(s.Principal["Service"], stringList{"sns.amazonaws.com"}) || len(s.Principal) != 1:
		fail("aws/feedback-queue-policy.json: principal %v, want the SNS service alone", s.Principal)
	case !slices.Equal(s.Condition["ArnEquals"]["aws:SourceArn"], stringList{topicARN}):
		fail("aws/feedback-queue-policy.json: no aws:SourceArn condition on the feedback topic %s: any topic could write feedback", topicARN)
	}
	return errs
}
