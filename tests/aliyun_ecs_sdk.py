#!/usr/bin/env python3
"""Make the official Alibaba Cloud ECS SDK (alibabacloud-ecs20140526, signature V3) send a
table of RPC requests to a loopback capture server, for `aliyun/tests/ecs_sdk_crosscheck.rs`.

Usage: aliyun_ecs_sdk.py 127.0.0.1:PORT

The Rust test owns the capture server and recomputes every captured Authorization header with
the project's own signer; this script only drives the SDK. It prints one JSON line per request
sent: {"case": ..., "action": ..., "access_key_id": ...}. The endpoint must be on loopback:
the script refuses anything else, so it can never reach a real Alibaba endpoint.

The keys below are made up; the capture server knows them.
"""

import json
import sys

from alibabacloud_ecs20140526 import models as ecs
from alibabacloud_ecs20140526.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from darabonba.runtime import RuntimeOptions

STATIC = ("LTAI5tStaticKeyForTests", "static-secret/with+odd=chars")
STS = ("STS.NUTestRoleKey", "sts-secret", "CAIS+token/with=padding==")

UNICODE = "迁移网关-测试 ünïcødé"
ODD = "a b+c&d=e%f*g~h/i?j#k"


def client(endpoint, creds):
    ak, secret = creds[0], creds[1]
    token = creds[2] if len(creds) > 2 else None
    config = Config(
        access_key_id=ak,
        access_key_secret=secret,
        security_token=token,
        protocol="http",
        region_id="cn-hangzhou",
        endpoint=endpoint,
        read_timeout=5000,
        connect_timeout=5000,
    )
    return Client(config)


def cases():
    yield "describe-disks-by-ids", STATIC, "describe_disks_with_options", ecs.DescribeDisksRequest(
        region_id="cn-hangzhou", disk_ids=json.dumps(["d-bp1", "d-bp2"], separators=(",", ":")), page_size=100, page_number=1
    )
    yield "create-disk-tags", STATIC, "create_disk_with_options", ecs.CreateDiskRequest(
        region_id="cn-hangzhou",
        zone_id="cn-hangzhou-i",
        disk_category="cloud_essd",
        performance_level="PL1",
        size=40,
        client_token="sync-1f2e3d",
        disk_name="sync disk 1",
        tag=[
            ecs.CreateDiskRequestTag(key="sync:disk", value="disk 01"),
            ecs.CreateDiskRequestTag(key="owner~*", value=UNICODE),
        ],
    )
    run = ecs.RunInstancesRequest(
        region_id="cn-hangzhou",
        image_id="m-bp1image",
        instance_type="ecs.g7.large",
        v_switch_id="vsw-bp1",
        security_group_id="sg-bp1",
        client_token="launch/0001~*",
        instance_name=UNICODE,
        description=ODD,
        amount=1,
        tag=[ecs.RunInstancesRequestTag(key="sync:launch", value="cut over*")],
    )
    yield "run-instances-static", STATIC, "run_instances_with_options", run
    yield "run-instances-sts", STS, "run_instances_with_options", run
    yield "describe-snapshots-sts", STS, "describe_snapshots_with_options", ecs.DescribeSnapshotsRequest(
        region_id="cn-hangzhou",
        status="accomplished",
        page_number=1,
        tag=[ecs.DescribeSnapshotsRequestTag(key="sync:disk", value="disk 01")],
        page_size=100,
    )
    yield "create-image-mapping", STS, "create_image_with_options", ecs.CreateImageRequest(
        region_id="cn-hangzhou",
        image_name="sync-cutover-2024",
        boot_mode="UEFI",
        client_token="img~1",
        disk_device_mapping=[
            ecs.CreateImageRequestDiskDeviceMapping(snapshot_id="s-root", device="/dev/xvda", disk_type="system"),
            ecs.CreateImageRequestDiskDeviceMapping(snapshot_id="s-data", device="/dev/xvdb", disk_type="data"),
        ],
    )
    yield "import-image-oss", STATIC, "import_image_with_options", ecs.ImportImageRequest(
        region_id="cn-hangzhou",
        image_name="sync-gateway-0.1.0",
        boot_mode="UEFI",
        architecture="x86_64",
        ostype="linux",
        client_token="import 1",
        disk_device_mapping=[
            ecs.ImportImageRequestDiskDeviceMapping(
                ossbucket="sync-images", ossobject="gateway/0.1.0 (uefi)/disk.raw", format="RAW"
            )
        ],
    )
    yield "attach-disk", STATIC, "attach_disk_with_options", ecs.AttachDiskRequest(
        instance_id="i-gateway", disk_id="d-bp1", delete_with_instance=False
    )


def main():
    endpoint = sys.argv[1]
    host = endpoint.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        sys.exit(f"refusing non-loopback endpoint {endpoint!r}")
    for name, creds, method, request in cases():
        runtime = RuntimeOptions(autoretry=False, max_attempts=1)
        getattr(client(endpoint, creds), method)(request, runtime)
        action = type(request).__name__[: -len("Request")]
        print(json.dumps({"case": name, "action": action, "access_key_id": creds[0]}), flush=True)


if __name__ == "__main__":
    main()
