"""The lambdalet gateway: the Lambda Invoke API, HTTP routes, admission, the autoscaler and its backends."""
