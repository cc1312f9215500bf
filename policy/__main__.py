"""aidc's policy pack: `pulumi preview --policy-pack policy/` (mandatory rules, see aidc_policies.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pulumi_policy import EnforcementLevel, PolicyPack, ResourceValidationPolicy  # noqa: E402

from aidc_policies import POLICIES  # noqa: E402


def _wrap(check):
    def validate(args, report_violation):
        for message in check(args.resource_type, args.props, args.name):
            report_violation(message)
    return validate


def policies() -> list[ResourceValidationPolicy]:
    return [ResourceValidationPolicy(name=name, description=description, validate=_wrap(check),
                                     enforcement_level=EnforcementLevel.MANDATORY)
            for name, (description, check) in POLICIES.items()]


if __name__ == "__main__":
    PolicyPack(name="aidc", enforcement_level=EnforcementLevel.MANDATORY, policies=policies())
