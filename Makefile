# One entry point for people and CI. Every target sets itself up on a fresh
# Debian machine with Python 3.11: Debian packages, the venv, the project.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The source tree seen at the path ansible and Python import it from.
COLLECTIONS := $(CURDIR)/collections
export PYTHONPATH := $(COLLECTIONS)$(if $(PYTHONPATH),:$(PYTHONPATH))
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS)

.PHONY: all deps venv link test test-fast test-lowest ansible-checks lint demo bench clean

all: test

# Debian packages the project needs at run time (FUSE 3 for `enclave sync`), and openssh-server for the
# test fleet (tests/integration/test_fleet.py starts sshd on loopback addresses; the service is not enabled).
DEBS := fuse3 libfuse3-3 openssh-server
deps:
	@if ! dpkg -s $(DEBS) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS) >/dev/null; \
	  else echo "warning: install $(DEBS) (sudo apt-get install $(DEBS))" >&2; fi; \
	fi

# Editable (pyproject.toml: dev-mode-dirs): the venv runs this checkout as it is now, never a stale copy.
# uv installs what pip would (the same requirements, from the same index), in a quarter of pip's time here.
# Byte-compiled at install, as pip does: uv leaves it to the first import, and where PYTHONDONTWRITEBYTECODE is
# set (this machine sets it) every process would compile ansible, boto3 and the rest again (a run took 12% longer).
# But not what nothing here imports (uv --compile-bytecode compiles it all, 27,000 files): the ansible package's
# collections other than amazon.aws and ansible.posix (15,000 files), moto's CloudFormation linter and the algebra it
# brings (cfn-lint, sympy, networkx, mpmath), the test suites numpy, scipy and scikit-learn ship. Measured on one
# machine: about 27 s for uv's, 20 s for this. A file left out only costs a process that imports it a compile; one
# that does not compile is left to its importer, as pip and uv leave it.
# The site-packages directory of the venv whose bin/ is $(1), for a recipe's shell.
site_packages = "$$($(1)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
NOT_IMPORTED := /ansible_collections/(?!amazon/aws/|ansible/posix/)|/site-packages/(sympy|networkx|cfnlint|mpmath)/|/site-packages/(numpy|scipy|sklearn)/(.*/)?tests/
$(BIN)/enclave: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q 'uv>=0.4'
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[test,examples]'
	$(BIN)/python -m compileall -qq -j 0 -x '$(NOT_IMPORTED)' $(call site_packages,$(BIN)) || true
	@touch $@

# The checkout's own sources too (compileall writes only what is stale): they are not in site-packages, and every
# process that imports them (the CLI, local enclaves, the local cloud, FUSE daemons) would compile them again.
venv: deps link $(BIN)/enclave
	@$(BIN)/python -m compileall -q -j 0 cli enclave_local enclave_server plugins

# Made once and then left alone: ln -sfn would remove it for a moment, and running tests import through it.
LINK := $(COLLECTIONS)/ansible_collections/confidential_ml/nitro
link:
	@mkdir -p $(dir $(LINK))
	@[ "$$(readlink $(LINK))" = "$(CURDIR)" ] || ln -sfn $(CURDIR) $(LINK)

# The collection's gates before the tests: ansible-lint --profile production and ansible-test
# sanity on the collection as built (scripts/ansible_checks.sh installs shellcheck from Debian when run as root;
# ansible-test builds its own virtual environments from PyPI on the first run).
# pytest-xdist spreads the tests over one worker per core (PYTEST_WORKERS=0: in this process); a file's tests stay
# together, and so do the tests of the session's owner release (tests/conftest.py names their xdist groups).
PYTEST_WORKERS ?= auto
PARALLEL := -n $(PYTEST_WORKERS) --dist loadgroup
# ansible-checks and test-lowest run beside each other, before pytest: ansible-lint and ansible-test sanity keep one
# core busy and leave the other idle, which the unit tests on the lowest versions fill (measured on one machine: 76-78 s
# together against 99-105 s one after the other). -O keeps each one's output together. Beside pytest they gained
# nothing (session 6): the machine is CPU-bound under pytest's workers.
test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy
	$(BIN)/antsibull-changelog lint
	$(MAKE) --no-print-directory -j 2 -O ansible-checks test-lowest
	$(BIN)/python -m pytest $(PARALLEL)

# The fast tier, for a developer between edits: no enclave, local cloud, ansible-playbook or FUSE mount
# (marker integration, tests/conftest.py) and nothing that takes seconds (marker slow). `make test` runs all.
test-fast: venv
	$(BIN)/python -m pytest -m "not integration and not slow"

# The unit tests on the lowest versions pyproject.toml allows for each direct dependency (uv's
# lowest-direct resolution; their own dependencies at the newest that fit), so the floors stay true.
# Byte-compiled only where the unit tests' processes (the CLI, modules run as scripts, the enclave server) spend
# their imports: the whole venv took 27 s to compile and saved the unit tests 9 s; these libraries take 2 s and
# save them 8 s (measured on one machine, idle: 68 s without, 60 s with).
LOWEST_VENV ?= .venv-lowest
LOWEST_COMPILED := ansible asn1crypto boto3 botocore cbor2 cryptography dateutil jinja2 jmespath markupsafe \
  s3transfer tink tqdm urllib3 yaml
$(LOWEST_VENV)/.installed: pyproject.toml
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/pip install -q 'uv>=0.4'
	$(LOWEST_VENV)/bin/uv pip install -q --python $(LOWEST_VENV)/bin/python --resolution lowest-direct \
	  -r pyproject.toml --extra test --extra examples
	site=$(call site_packages,$(LOWEST_VENV)/bin) \
	  && $(LOWEST_VENV)/bin/python -m compileall -qq -j 0 $(addprefix "$$site"/,$(LOWEST_COMPILED)) || true
	@touch $@

test-lowest: link $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/uv pip list --python $(LOWEST_VENV)/bin/python 2>/dev/null \
	  | grep -iE '^(asn1crypto|boto3|botocore|cbor2|cryptography|mfusepy|pyyaml|tink|tqdm) '
	$(LOWEST_VENV)/bin/python -m pytest tests/unit -p no:cacheprovider $(PARALLEL)

ansible-checks: venv
	VENV=$(VENV) scripts/ansible_checks.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The main job end to end on the local backend: the owner's pipeline, then the
# user's confidential ML job, its predictions and its verified receipt. Leaves
# nothing running (cleanup.yml, also on failure). State lives under build/.
# Each party signs with the profile the local KMS issued it (`enclave local up`, run by owner.yml, writes the
# file); credentials in the environment would win over a profile, so they are dropped.
DEMO_HOME := $(CURDIR)/build/demo-home
DEMO_ENV := env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN ENCLAVE_HOME=$(DEMO_HOME) \
	AWS_SHARED_CREDENTIALS_FILE=$(DEMO_HOME)/kms/credentials AWS_DEFAULT_REGION=us-east-1
JOB := build/jobs/localhost
demo: venv
	@rm -rf build/jobs
	@trap '$(DEMO_ENV) $(BIN)/ansible-playbook playbooks/cleanup.yml >/dev/null 2>&1 || true' EXIT; set -e; \
	echo "== owner: build and measure the enclave image, allow its PCR0 in the key policy, train, seal, publish"; \
	$(DEMO_ENV) AWS_PROFILE=owner $(BIN)/ansible-playbook playbooks/owner.yml; \
	echo "== user: host ready, package and dataset into the enclave, run ml_algorithm.py, outputs back"; \
	$(DEMO_ENV) AWS_PROFILE=enclave-host $(BIN)/ansible-playbook playbooks/run_job.yml -e script=ml_algorithm.py; \
	echo "== predictions (first rows of $(JOB)/output/results.csv)"; \
	head -n 11 $(JOB)/output/results.csv; \
	echo "== metrics ($(JOB)/output/metrics.json)"; \
	cat $(JOB)/output/metrics.json; \
	echo "== receipt ($(JOB)/receipt.json), verified offline against the release and the outputs"; \
	$(DEMO_ENV) $(BIN)/enclave receipt verify $(JOB)/receipt.json --release build/owner/release/release.json \
	  --outputs $(JOB)/output; \
	echo "== stopping the local enclave and the local cloud"

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(COLLECTIONS) build .pytest_cache .ruff_cache .mypy_cache
