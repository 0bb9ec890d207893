# optmon base image: Python 3.11 slim with the optmon package and its generated protobuf code installed into
# /opt/venv. Built once; the per-service images (services/*/Dockerfile, gateway/Dockerfile) start FROM it.
#   docker build -f deploy/docker/base.Dockerfile -t optmon-base:TAG .
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml ./
COPY protos ./protos
COPY scripts/gen_protos.sh ./scripts/gen_protos.sh
COPY services ./services
RUN pip install grpcio-tools==1.85.1 googleapis-common-protos \
 && PYTHON=/opt/venv/bin/python ./scripts/gen_protos.sh \
 && pip install .

FROM python:3.11-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 OPTMON_HOST=0.0.0.0
RUN groupadd --gid 10001 optmon && useradd --uid 10001 --gid optmon --no-create-home --shell /usr/sbin/nologin optmon
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
