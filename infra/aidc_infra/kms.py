"""KMS: Kubernetes secrets encrypted through a KMS v2 provider, and the key reference for checkpoints.

The key itself lives in the external KMS (AWS KMS, Cloud KMS, Key Vault, Vault, an HSM); aidc
references it. KMS v2 follows key rotation on its own: when the plugin reports a new key id, the
API server wraps new data keys with it, so rotation is a property of the key, recorded here
and enforced by the policy pack (at most 90 days).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import yaml
from pulumi_kubernetes.core.v1 import ConfigMap, Secret

from aidc.spec import ClusterSpec
from aidc_infra.common import AGENT_NAMESPACE, LABEL_DOMAIN, PKG, managed_labels

ENCRYPTION_FILE = "encryption-configuration.yaml"


def plugin_name(spec: ClusterSpec) -> str:
    return f"aidc-{spec.kms.provider}"


def encryption_configuration(spec: ClusterSpec) -> dict:
    """The API server's --encryption-provider-config (apiserver.config.k8s.io/v1)."""
    return {
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "EncryptionConfiguration",
        "resources": [{
            "resources": ["secrets"],
            "providers": [
                {"kms": {"apiVersion": "v2", "name": plugin_name(spec),
                         "endpoint": f"unix:///var/run/kmsplugin/{spec.kms.provider}.sock", "timeout": "3s"}},
                # Read-only fallback: secrets written before encryption was enabled stay readable
                # until `kubectl get secrets -A -o json | kubectl replace -f -` rewrites them.
                {"identity": {}},
            ],
        }],
    }


def key_reference(spec: ClusterSpec) -> dict[str, str]:
    """What a trainer needs to envelope-encrypt checkpoints under the cluster's key: where the
    key lives, never a secret (a pkcs11 PIN stays in the named variable or file). A pod that
    mounts the ConfigMap opens the key with `aidc.kms.open_from_reference(<mount>)`."""
    kms = spec.kms
    ref = {"provider": kms.provider, "key_id": kms.key_id, "rotation_days": str(kms.rotation_days),
           "envelope": "AES-256-GCM data key per checkpoint (aidc.checkpoint format 1), wrapped by key_id"}
    if kms.provider == "local":
        ref["keyring"] = kms.keyring or "/var/lib/aidc/keyring"
    if kms.pkcs11 is not None:
        ref.update({"pkcs11_module": kms.pkcs11.module, "pkcs11_token_label": kms.pkcs11.token_label})
        ref.update({f"pkcs11_{k}": v for k, v in (("pin_env", kms.pkcs11.pin_env),
                                                  ("pin_file", kms.pkcs11.pin_file)) if v})
    if kms.aws is not None:
        ref.update({f"aws_{k}": v for k, v in (("region", kms.aws.region),
                                               ("signing_key_id", kms.aws.signing_key_id)) if v})
    return ref


@dataclass(frozen=True)
class KmsEncryptionArgs:
    spec: ClusterSpec
    agent_namespace: pulumi.Input[str] = AGENT_NAMESPACE


class KmsEncryption(pulumi.ComponentResource):
    def __init__(self, name: str, args: KmsEncryptionArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(f"{PKG}:kms:KmsEncryption", name, None, opts)
        spec = args.spec
        child = pulumi.ResourceOptions(parent=self)
        annotations = {f"{LABEL_DOMAIN}/kms-key-id": spec.kms.key_id,
                       f"{LABEL_DOMAIN}/kms-rotation-days": str(spec.kms.rotation_days)}
        self.document = yaml.safe_dump(encryption_configuration(spec), sort_keys=False)
        # The control-plane nodes' playbook copies this file to the API servers.
        self.encryption_config = Secret(
            f"{name}-encryption-config",
            metadata={"name": "aidc-encryption-config", "namespace": "kube-system",
                      "labels": managed_labels("kms"), "annotations": annotations},
            type="Opaque", string_data={ENCRYPTION_FILE: self.document}, opts=child)
        self.key_reference = ConfigMap(
            f"{name}-key-reference",
            metadata={"name": "aidc-kms", "namespace": args.agent_namespace,
                      "labels": {**managed_labels("kms"), f"{LABEL_DOMAIN}/kms": "key-reference"}},
            data=key_reference(spec), opts=child)
        self.register_outputs({"plugin": plugin_name(spec)})
