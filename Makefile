# radfm: `make demo` runs the main job end to end on local defaults; `make test` runs every test.
SHELL := bash
CARGO ?= cargo
export RADFM_CACHE ?= $(HOME)/.cache/radfm

.PHONY: fuzz install all build test test-node node-deps images unit-test lint fmt crds libtorch demo-cluster cluster-tools py-deps s3-server health-tool demo bench-loader bench-trainer bench-allreduce bench-nccl bench-gpu device-kit bench-scaling bench-federated bench-monitor bench-operator clean

all: build

build: libtorch
	$(CARGO) build --workspace --bins

## libtorch: the libtorch tch 0.26 needs (PyPI torch 2.13.0 without its CUDA packages, ~540 MB),
## cached under $(RADFM_CACHE) and linked into the checkout as .libtorch (see .cargo/config.toml)
LIBTORCH_ENV := $(RADFM_CACHE)/libtorch-2.13.0
libtorch:
	@if [ ! -f "$(LIBTORCH_ENV)/.radfm-ok" ]; then \
	  rm -rf "$(LIBTORCH_ENV)" && python3 -m venv "$(LIBTORCH_ENV)" && \
	  "$(LIBTORCH_ENV)/bin/pip" install -q --no-deps torch==2.13.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 && \
	  touch "$(LIBTORCH_ENV)/.radfm-ok"; \
	fi
	@ln -sfn "$$(ls -d $(LIBTORCH_ENV)/lib/python3*/site-packages/torch)" .libtorch

## install: the radfm and radfm-trainer binaries into $(PREFIX)/bin, and a radfm built without
## libtorch (cluster, registry and data commands) as kubectl-radfm (so `kubectl radfm get` works)
PREFIX ?= $(HOME)/.local
install: libtorch
	$(CARGO) build --release -p radfm -p radfm-trainer
	$(CARGO) build --release -p radfm --no-default-features --target-dir target/without-libtorch
	install -d "$(PREFIX)/bin"
	install target/release/radfm target/release/radfm-trainer "$(PREFIX)/bin/"
	install target/without-libtorch/release/radfm "$(PREFIX)/bin/kubectl-radfm"

## crds: regenerate the CRDs from the Rust types (manifests/ and the Helm chart)
crds: libtorch
	$(CARGO) run -q -p radfm-operator -- crd --out-dir manifests/crds --argocd-out-dir manifests/argocd
	cp manifests/crds/*.yaml charts/radfm/crds/
	mkdir -p charts/radfm/files && cp manifests/argocd/argocd-cm-health.yaml charts/radfm/files/
	$(CARGO) run -q -p radfm-operator -- crd --reference > docs/crd-reference.md

## cluster-tools: build the pinned control plane (etcd, kube-apiserver, kube-scheduler,
## kube-controller-manager, kubectl), kwok, helm and a real node (kubelet, kube-proxy,
## containerd + shim + ctr, CoreDNS), and Kueue's controller-manager with its CRDs and webhooks
## (tests/cluster/kueue), from Go modules (cached)
cluster-tools:
	@bash tests/cluster/build-tools.sh >/dev/null
	@bash tests/cluster/build-kueue.sh >/dev/null

## node-deps: what the real node takes from Debian: runc, the CNI plugins, iptables and conntrack
## (kube-proxy), umoci and catatonit (images without Docker), skopeo (reads them as podman does)
NODE_DEPS := runc containernetworking-plugins iptables conntrack umoci catatonit ca-certificates skopeo
node-deps:
	@missing=$$(for p in $(NODE_DEPS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; fi

## images: OCI image archives of radfm-operator and the CPU radfm-trainer (with radfm) from the
## release binaries, without Docker or a registry, in target/images/ (`kind load image-archive`,
## `ctr images import`, `docker load`); named docker.io/radfm/<name>:$(IMAGE_TAG)
IMAGE_TAG ?= dev
images: libtorch node-deps
	$(CARGO) build --release -p radfm-operator -p radfm-trainer -p radfm
	bash tests/cluster/build-images.sh target/release target/images $(IMAGE_TAG)

## test: unit tests, then end-to-end tests against a real API server with simulated GPU nodes,
## and on a real node (kubelet, containerd) running radfm's own images
test: cluster-tools node-deps py-deps s3-server health-tool build
	RADFM_PYTHON="$(PY_ENV)/bin/python" RADFM_CLUSTER_TOOLS="$$(bash tests/cluster/build-tools.sh)" RADFM_HEALTH_TOOLS="$$(bash tests/cluster/build-health.sh)" RADFM_KUEUE="$$(bash tests/cluster/build-kueue.sh)" $(CARGO) test --workspace --no-fail-fast

## test-node: only the real-node end-to-end tests (tests/e2e/node.rs)
test-node: cluster-tools node-deps py-deps s3-server health-tool build
	RADFM_PYTHON="$(PY_ENV)/bin/python" RADFM_CLUSTER_TOOLS="$$(bash tests/cluster/build-tools.sh)" RADFM_HEALTH_TOOLS="$$(bash tests/cluster/build-health.sh)" RADFM_KUEUE="$$(bash tests/cluster/build-kueue.sh)" $(CARGO) test -p radfm-e2e --test node

unit-test: libtorch
	$(CARGO) test --workspace --lib --bins

lint: libtorch
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p radfm --all-targets --no-default-features -- -D warnings
	# The fuzz targets (their own workspace) compile against today's types: they once drifted unseen.
	$(CARGO) check --manifest-path fuzz/Cargo.toml --target-dir target --locked

fmt:
	$(CARGO) fmt --all

## demo: MAE pretraining on this machine, no cluster: a synthetic cohort, `radfm run` of
## manifests/samples/trainingjob-local.yaml with 2 CPU workers, export, k-NN / linear probes
## against a random-init encoder, a loss-curve SVG (DEMO_STEPS shortens it, e.g. in CI);
## OBJECTIVE=contrastive (or mae,contrastive) pretrains on the images with their reports and
## adds the zero-shot evaluation and retrieval
DEMO_DIR ?= /tmp/radfm-demo
DEMO_STEPS ?= 300
DEMO_SAMPLES ?= 1024
# Visible lesions: a signal self-supervised features pick up (k-NN beats random init on it).
DEMO_LESIONS ?= --lesion-radius 0.15,0.25 --lesion-prevalence 0.4
BIN := target/debug
demo: build
	@rm -rf "$(DEMO_DIR)" && mkdir -p "$(DEMO_DIR)"
	$(BIN)/radfm synth --out "$(DEMO_DIR)/cohort" --samples $(DEMO_SAMPLES) --size 64 --seed 1 $(DEMO_LESIONS)
	$(BIN)/radfm synth --out "$(DEMO_DIR)/labelled" --samples 600 --size 64 --seed 2 $(DEMO_LESIONS)
	$(BIN)/radfm run manifests/samples/trainingjob-local.yaml --workers 2 --steps $(DEMO_STEPS) \
	  --dataset "file://$(DEMO_DIR)/cohort" --checkpoint "file://$(DEMO_DIR)/checkpoints" \
	  --log "$(DEMO_DIR)/progress.jsonl" --loss-plot "$(DEMO_DIR)/loss.svg" \
	  $(if $(OBJECTIVE),--objective $(OBJECTIVE))
	$(BIN)/radfm export "file://$(DEMO_DIR)/checkpoints" "file://$(DEMO_DIR)/model"
	$(BIN)/radfm eval --model "file://$(DEMO_DIR)/model" --dataset "file://$(DEMO_DIR)/labelled"
	$(if $(findstring contrastive,$(OBJECTIVE)),$(BIN)/radfm eval --model "file://$(DEMO_DIR)/model" \
	  --dataset "file://$(DEMO_DIR)/labelled" --zero-shot)
	@echo; echo "demo artifacts under $(DEMO_DIR):"; \
	 echo "  cohort/         synthetic training shards + index.json"; \
	 echo "  labelled/       held-out labelled cohort used by the probes"; \
	 echo "  checkpoints/    committed checkpoints (manifests/ + step-*/)"; \
	 echo "  model/          encoder.safetensors (timm names) + model_card.json"; \
	 echo "                  (+ text.safetensors, tokenizer.json with OBJECTIVE=contrastive)"; \
	 echo "  progress.jsonl  rank 0's progress lines;  loss.svg  the loss curve"

## demo-cluster: a simulated GPU cluster, the operator, and the sample TrainingJob from apply to
## Succeeded (no trainer image runs on the simulated nodes)
demo-cluster: cluster-tools build
	RADFM_CLUSTER_TOOLS="$$(bash tests/cluster/build-tools.sh)" $(CARGO) run -q -p radfm-e2e --bin radfm-cluster-demo

clean:
	$(CARGO) clean

## py-deps: the Python used by interoperability tests (pydicom test files, webdataset), cached
PY_DEPS := pydicom==3.0.2 webdataset==1.0.2 numpy==2.4.6 pillow==13.0.0 torch==2.13.0 safetensors==0.8.0 \
  torchvision==0.28.0 timm==1.0.31
PY_ENV := $(RADFM_CACHE)/pyenv
py-deps:
	@stamp="$(PY_ENV)/.radfm-$$(echo '$(PY_DEPS)' | sha256sum | cut -c1-12)"; \
	if [ ! -f "$$stamp" ]; then \
	  rm -rf "$(PY_ENV)" && python3 -m venv "$(PY_ENV)" && \
	  "$(PY_ENV)/bin/pip" install -q $(PY_DEPS) && touch "$$stamp"; \
	fi

## s3-server: a real S3 server for the tests (versitygw's POSIX gateway, from its pinned Go
## module in tests/cluster/s3: it honours conditional writes), cached
S3_SERVER := $(RADFM_CACHE)/versitygw-v1.8.0/versitygw
s3-server:
	@[ -x "$(S3_SERVER)" ] || (cd tests/cluster/s3 && GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 \
	  go build -trimpath -ldflags="-s -w" -o "$(S3_SERVER).tmp" github.com/versity/versitygw/cmd/versitygw && \
	  mv "$(S3_SERVER).tmp" "$(S3_SERVER)")

## health-tool: radfm-health, which judges objects with kstatus (what Flux uses) and Argo CD's
## own Lua health evaluation, built from their pinned Go modules in tests/cluster/health, cached
health-tool:
	@bash tests/cluster/build-health.sh >/dev/null

## fuzz: each cargo-fuzz target (fuzz/) for FUZZ_SECONDS (default 60) on the nightly toolchain,
## growing a corpus cached outside git from the seeds in fuzz/corpus; a crash stops it and leaves
## the input in fuzz/artifacts/<target>/ (turn it into a regression test)
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= shard_reader image_decoders dicom_ingest dataset_index site_report resources rendezvous
CARGO_FUZZ_ROOT := $(RADFM_CACHE)/cargo-fuzz-0.13.1
fuzz:
	@[ -x "$(CARGO_FUZZ_ROOT)/bin/cargo-fuzz" ] || cargo install --locked cargo-fuzz@0.13.1 --root "$(CARGO_FUZZ_ROOT)"
	@cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p "$(RADFM_CACHE)/fuzz-corpus/$$t" && \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s" && \
	  PATH="$(CARGO_FUZZ_ROOT)/bin:$$PATH" cargo +nightly fuzz run $$t \
	    "$(RADFM_CACHE)/fuzz-corpus/$$t" corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 -print_final_stats=1 2>&1 \
	    | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+== ERROR|SUMMARY|Test unit written|panicked|thread)" ; \
	  test "$${PIPESTATUS[0]}" = 0 || exit 1; done

## bench-loader: radfm's loader vs Python webdataset + PIL on the same shards, per CPU core
BENCH_DIR ?= /tmp/radfm-bench-loader
bench-loader: py-deps
	$(CARGO) build -q --release -p radfm -p radfm-bench
	rm -rf $(BENCH_DIR) && ./target/release/radfm synth --out $(BENCH_DIR) --samples 2048 --size 160 --shard-mib 8 --seed 1
	@./target/release/bench-loader $(BENCH_DIR) 2 | tee /tmp/radfm-bench-rs.txt
	@OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "$(PY_ENV)/bin/python" bench/loader_webdataset.py $(BENCH_DIR) 2 | tee /tmp/radfm-bench-py.txt
	@echo "memory: the same, one epoch over one shard of about 512 MiB"
	rm -rf $(BENCH_DIR)-512 && ./target/release/radfm synth --out $(BENCH_DIR)-512 --samples 12600 --size 160 --shard-mib 512 --seed 1
	@./target/release/bench-loader $(BENCH_DIR)-512 1
	@OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "$(PY_ENV)/bin/python" bench/loader_webdataset.py $(BENCH_DIR)-512 1
	rm -rf $(BENCH_DIR)-512
	@r=$$(grep -o 'images_per_cpu_s=[0-9.]*' /tmp/radfm-bench-rs.txt | cut -d= -f2); \
	 p=$$(grep -o 'images_per_cpu_s=[0-9.]*' /tmp/radfm-bench-py.txt | cut -d= -f2); \
	 echo "bench: loader ratio=$$(python3 -c "print(round($$r/$$p, 2))")"

## bench-trainer: MAE training images/s of radfm (tch) vs the same model, batch and precision in
## PyTorch on the same CPU (BENCH_ARGS: arch image patch batch steps threads), in TRAINER_ROUNDS
## alternating pairs; the ratio is the median pair's (bench/compare_trainer.py)
BENCH_ARGS ?= vit-tiny 64 8 32 20 2
TRAINER_ROUNDS ?= 5
bench-trainer: py-deps libtorch
	$(CARGO) build -q --release -p radfm-bench
	@rm -f /tmp/radfm-bench-trainer-rs.jsonl /tmp/radfm-bench-trainer-py.jsonl
	@for i in $$(seq $(TRAINER_ROUNDS)); do \
	  ./target/release/bench-trainer $(BENCH_ARGS) >> /tmp/radfm-bench-trainer-rs.jsonl && \
	  "$(PY_ENV)/bin/python" bench/trainer_pytorch.py $(BENCH_ARGS) >> /tmp/radfm-bench-trainer-py.jsonl || exit 1; \
	done
	@python3 bench/compare_trainer.py /tmp/radfm-bench-trainer-rs.jsonl /tmp/radfm-bench-trainer-py.jsonl

## bench-federated: federated FedAvg (the real `radfm federate` rounds) vs pooled central vs
## single-site pretraining at equal compute, by k-NN AUROC at each site (bench/federated_quality.sh)
bench-federated: libtorch
	$(CARGO) build -q --release -p radfm -p radfm-trainer
	bash bench/federated_quality.sh

## bench-monitor: detection delay and false alarms of site monitoring over seeds: three sites
## looking weekly, one replacing its scanner gradually (bench/monitor_delay.sh)
bench-monitor: libtorch
	$(CARGO) build -q --release -p radfm -p radfm-trainer
	bash bench/monitor_delay.sh

## bench-operator: radfm's operator against Kubeflow's training-operator v1 (PyTorchJob) and
## Kubeflow Trainer v2 (TrainJob on JobSet) on one kwok control plane: 1,000 jobs x 8 workers in a
## burst, 100 workers killed, the training-operator at matched and default settings, Trainer v2 at
## matched settings, radfm's cost at more sizes (tests/src/bin/radfm-bench-operator.rs; BENCH_JOBS,
## BENCH_WORKERS, BENCH_KILL, BENCH_DEFAULTS_JOBS, BENCH_TRAINER_V2_JOBS, BENCH_GROWTH;
## docs/benchmarks.md)
bench-operator: cluster-tools libtorch
	@bash tests/cluster/build-kubeflow.sh >/dev/null
	@bash tests/cluster/build-trainer-v2.sh >/dev/null
	$(CARGO) build -q --release -p radfm-operator --bin radfm-operator
	$(CARGO) build -q --release -p radfm-e2e --bin radfm-bench-operator
	RADFM_CLUSTER_TOOLS="$$(bash tests/cluster/build-tools.sh)" RADFM_KUBEFLOW="$$(bash tests/cluster/build-kubeflow.sh)" \
	  RADFM_TRAINER_V2="$$(bash tests/cluster/build-trainer-v2.sh)" target/release/radfm-bench-operator

## bench-allreduce: bus bandwidth of radfm's CPU ring all-reduce vs torch.distributed gloo, same
## machine, ranks (2, 4) and sizes (MiB), one process per rank on loopback
ALLREDUCE_MIB ?= 1 4 16 64 256
bench-allreduce: py-deps libtorch
	$(CARGO) build -q --release -p radfm-bench
	@rm -f /tmp/radfm-allreduce-rs.jsonl /tmp/radfm-allreduce-gloo.jsonl
	@for w in 2 4; do \
	  ./target/release/bench-allreduce $$w $(ALLREDUCE_MIB) >> /tmp/radfm-allreduce-rs.jsonl && \
	  "$(PY_ENV)/bin/python" bench/allreduce_gloo.py $$w $(ALLREDUCE_MIB) >> /tmp/radfm-allreduce-gloo.jsonl || exit 1; \
	done
	@python3 bench/compare_allreduce.py /tmp/radfm-allreduce-rs.jsonl /tmp/radfm-allreduce-gloo.jsonl

## bench-nccl: all-reduce bus bandwidth of radfm's NCCL backend vs torch.distributed NCCL on
## this machine's GPUs (needs a CUDA machine with libnccl; prints why not otherwise)
bench-nccl:
	$(CARGO) build -q --release -p radfm-bench --bin bench-nccl
	@g=$$("$(PYTHON_CUDA)" -c 'import torch; print(torch.cuda.device_count())') && \
	 ./target/release/bench-nccl busbw $$g $(ALLREDUCE_MIB) > /tmp/radfm-nccl-rs.jsonl && \
	 BACKEND=nccl "$(PYTHON_CUDA)" bench/allreduce_gloo.py $$g $(ALLREDUCE_MIB) > /tmp/radfm-nccl-torch.jsonl
	@python3 bench/compare_allreduce.py /tmp/radfm-nccl-rs.jsonl /tmp/radfm-nccl-torch.jsonl nccl

## bench-gpu: every GPU check in one run (bench/gpu.sh): the NCCL backend's verification and
## bandwidth, then ViT-B/16 MAE bf16 throughput and model-FLOPs utilisation vs PyTorch. Needs
## a CUDA machine, LIBTORCH pointing at a CUDA libtorch and PYTHON_CUDA at a python with CUDA torch
PYTHON_CUDA ?= python3
bench-gpu:
	RADFM_LINK_CUDA=1 $(CARGO) build -q --release -p radfm-bench --bin bench-nccl --bin bench-trainer
	PYTHON="$(PYTHON_CUDA)" bench/gpu.sh target/release

## device-kit: bench/gpu.sh's binaries for a CUDA machine without cargo whose python has torch
## $(DEVICE_TORCH) (the lent device machine): bench-nccl needs no libtorch; bench-trainer is
## built from a copy of the tree on tch $(DEVICE_TCH), the tch of that torch (tch's dtype codes
## change between libtorch versions, so a 2.13 build must not load 2.11), and loads that torch's
## libraries there. Lands in .device/ (ignored): carry it and run `bench/gpu.sh .device`
DEVICE_TORCH ?= 2.11.0
DEVICE_TCH ?= 0.24.0
DEVICE_LIBTORCH := $(RADFM_CACHE)/torch-$(DEVICE_TORCH)
DEVICE_SRC := $(RADFM_CACHE)/device-src
device-kit:
	@if [ ! -f "$(DEVICE_LIBTORCH)/.radfm-ok" ]; then \
	  rm -rf "$(DEVICE_LIBTORCH)" && mkdir -p "$(DEVICE_LIBTORCH)" && \
	  python3 -m pip download -q --no-deps --only-binary=:all: torch==$(DEVICE_TORCH) -d "$(DEVICE_LIBTORCH)" && \
	  (cd "$(DEVICE_LIBTORCH)" && unzip -q torch-*.whl 'torch/include/*' 'torch/lib/*' 'torch/share/*' && rm torch-*.whl) && \
	  touch "$(DEVICE_LIBTORCH)/.radfm-ok"; \
	fi
	$(CARGO) build -q --release -p radfm-bench --bin bench-nccl
	rm -rf "$(DEVICE_SRC)" && mkdir -p "$(DEVICE_SRC)"
	git ls-files -z | xargs -0 cp --parents -t "$(DEVICE_SRC)"
	sed -i 's/^tch = .*/tch = "=$(DEVICE_TCH)"/; s/^torch-sys = .*/torch-sys = "=$(DEVICE_TCH)"/' "$(DEVICE_SRC)/Cargo.toml"
	cd "$(DEVICE_SRC)" && LIBTORCH="$(DEVICE_LIBTORCH)/torch" LIBTORCH_CXX11_ABI=1 RADFM_LINK_CUDA=1 \
	  CARGO_TARGET_DIR="$(RADFM_CACHE)/target-device" \
	  RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined" \
	  $(CARGO) build -q --release -p radfm-bench --bin bench-trainer
	mkdir -p .device
	cp target/release/bench-nccl "$(RADFM_CACHE)/target-device/release/bench-trainer" .device/
	strip .device/bench-nccl .device/bench-trainer
	@du -sh .device

## bench-scaling: trainer images/s on 1, 2, 4 local ranks (same per-rank batch) and the
## data-parallel efficiency against 1 rank
bench-scaling: libtorch
	$(CARGO) build -q --release -p radfm -p radfm-trainer
	@python3 bench/scaling.py $(CURDIR)/target/release/radfm-trainer $(CURDIR)/target/release/radfm /tmp/radfm-bench-scaling
