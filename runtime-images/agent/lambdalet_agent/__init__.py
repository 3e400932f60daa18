"""The lambdalet agent: the server side of the Lambda Runtime API, one per execution environment."""
