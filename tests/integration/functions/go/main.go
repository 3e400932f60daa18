// The conformance function built with AWS's aws-lambda-go (a provided.al2023 `bootstrap`); every runtime
// has a twin with the same actions.
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-lambda-go/lambda"
	"github.com/aws/aws-lambda-go/lambdacontext"
)

// ConformanceError is the error type the function raises.
type ConformanceError struct{ Message string }

func (e ConformanceError) Error() string { return e.Message }

type event struct {
	Action  string  `json:"action"`
	Payload any     `json:"payload"`
	Message string  `json:"message"`
	Seconds float64 `json:"seconds"`
	Size    int     `json:"size"`
}

var invocations int

func handle(ctx context.Context, ev event) (map[string]any, error) {
	invocations++
	switch ev.Action {
	case "echo":
		return map[string]any{"echo": ev.Payload}, nil
	case "log":
		fmt.Printf("conformance log %s\n", ev.Message)
		return map[string]any{"logged": true}, nil
	case "count":
		return map[string]any{"count": invocations}, nil
	case "error":
		return nil, ConformanceError{ev.Message}
	case "sleep":
		time.Sleep(time.Duration(ev.Seconds * float64(time.Second)))
		return map[string]any{"slept": ev.Seconds}, nil
	case "crash":
		os.Exit(3)
	case "big":
		return map[string]any{"data": strings.Repeat("x", ev.Size)}, nil
	case "context":
		lc, _ := lambdacontext.FromContext(ctx)
		deadline, _ := ctx.Deadline()
		memory, _ := strconv.Atoi(os.Getenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"))
		return map[string]any{
			"requestId":          lc.AwsRequestID,
			"remainingMs":        time.Until(deadline).Milliseconds(),
			"functionName":       lambdacontext.FunctionName,
			"functionVersion":    lambdacontext.FunctionVersion,
			"memoryMB":           memory,
			"invokedFunctionArn": lc.InvokedFunctionArn,
			"logGroupName":       lambdacontext.LogGroupName,
			"logStreamName":      lambdacontext.LogStreamName,
		}, nil
	}
	return nil, fmt.Errorf("unknown action %s", ev.Action)
}

func main() {
	if os.Getenv("CONFORMANCE_INIT_FAIL") != "" {
		// A Go function fails its init by exiting before lambda.Start: the platform reports Runtime.ExitError.
		fmt.Fprintln(os.Stderr, "init failed")
		os.Exit(4)
	}
	lambda.Start(handle)
}
