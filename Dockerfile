# The platform's image: a Ray image plus this platform's wheel (conf/ included), installed by
# docker/install.sh alone, which tests/test_deploy.py runs in a fresh virtualenv.
#   python -m build --wheel          # dist/mlplatform-<version>-py3-none-any.whl (one wheel)
#   docker build --build-arg BASE_IMAGE=<deploy.base_image or base_image_gpu> -t <deploy.image> .
# `python run.py +mode=deploy` prints this command with the values from conf/.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311
FROM ${BASE_IMAGE}

COPY --chown=ray:users constraints.txt /tmp/mlplatform/constraints.txt
COPY --chown=ray:users docker/install.sh /tmp/mlplatform/docker/install.sh
COPY --chown=ray:users dist/*.whl /tmp/mlplatform/dist/
RUN sh /tmp/mlplatform/docker/install.sh /tmp/mlplatform/dist/*.whl

# Serve's high-throughput mode (conf ray.serve_high_throughput, true by default): Ray reads it
# when each process starts; HAProxy resends a request whose ingress died unanswered. The
# RayService and RayJobs set the same variables from conf/.
ENV PYTHONUNBUFFERED=1 \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_HAPROXY_RETRY_ON="conn-failure empty-response"

# No CMD of its own: KubeRay starts each pod with `ray start` (the base image's default
# otherwise). Jobs run `python -m mlplatform +mode=...` (rayjob-*.yaml); Serve loads
# mlplatform.deployments.app:build_app from serve_config.yaml.
