#!/bin/sh
# Ansible dynamic inventory from the cluster spec: groups per node pool, host vars from the spec.
#   AIDC_STACK=prod ansible-playbook -i playbooks/inventory/aidc_spec.sh playbooks/site.yml
# Ansible calls this with --list (and --host NAME); both are passed through to `aidc inventory`.
# AIDC may name another command for the CLI, e.g. "/opt/aidc/venv/bin/python -m aidc" (left
# unquoted on purpose so it splits into words).
# shellcheck disable=SC2086
exec ${AIDC:-aidc} inventory --stack "${AIDC_STACK:-lab}" "$@"
