# The two commands of the README: `make serve` and `make test`. Both set themselves up first:
# `serve` only the venv, `test` also the Debian packages listed in tools/packages.
.PHONY: setup setup-test serve test test-host test-vm

setup:
	@tools/setup

setup-test:
	@tools/setup --test

serve: setup
	.venv/bin/ironsocket serve

# Host suite (userspace record layer, real clients), then the kTLS suite inside the VM.
test: setup-test
	.venv/bin/python -m pytest
	tools/vm/ktls-vm run -- python -m pytest -m ktls -p no:cacheprovider

test-host: setup-test
	.venv/bin/python -m pytest

test-vm: setup-test
	tools/vm/ktls-vm run -- python -m pytest -m ktls -p no:cacheprovider
