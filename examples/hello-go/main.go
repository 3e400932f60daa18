// Returns a greeting for event["name"]: a provided.al2023 function built with aws-lambda-go
// (`lambdalet up` builds it into `bootstrap` when Go is installed).
package main

import (
	"context"
	"fmt"

	"github.com/aws/aws-lambda-go/lambda"
)

type event struct {
	Name string `json:"name"`
}

type greeting struct {
	Message string `json:"message"`
}

func handle(ctx context.Context, ev event) (greeting, error) {
	name := ev.Name
	if name == "" {
		name = "world"
	}
	fmt.Printf("greeting %s\n", name)
	return greeting{Message: fmt.Sprintf("Hello, %s!", name)}, nil
}

func main() {
	lambda.Start(handle)
}
