# The `lambdalet.test/python-ric` test image, for running the cluster tests against a real cluster
# (LAMBDALET_TEST_CLUSTER=existing): AWS's own Python base image, whose /lambda-entrypoint.sh runs the
# Runtime Interface Client directly when AWS_LAMBDA_RUNTIME_API is set. Build and load it, e.g. for kind:
#   docker build -t lambdalet.test/python-ric:latest -f tests/cluster/tools/images/python-ric.Dockerfile tests/cluster/tools/images
#   kind load docker-image lambdalet.test/python-ric:latest
FROM public.ecr.aws/lambda/python:3.12
COPY python-ric/app.py ${LAMBDA_TASK_ROOT}/
CMD ["app.handler"]
