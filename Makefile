# The two commands of the README: `make serve` and `make test`. Both set themselves up first.
.PHONY: setup serve test test-host test-vm

setup:
	@tools/setup

serve: setup
	.venv/bin/ironsocket serve

# Host suite (userspace record layer, real clients), then the kTLS suite inside the VM.
test: setup
	.venv/bin/python -m pytest
	tools/vm/ktls-vm run -- python -m pytest -m ktls -p no:cacheprovider

test-host: setup
	.venv/bin/python -m pytest

test-vm: setup
	tools/vm/ktls-vm run -- python -m pytest -m ktls -p no:cacheprovider
