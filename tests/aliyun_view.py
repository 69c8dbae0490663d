#!/usr/bin/env python3
"""What Alibaba Cloud's own ECS SDK (alibabacloud-ecs20140526) sees in an ECS endpoint: the
disks, snapshots, images and instances of a region, as one JSON object on stdout. The
gateway's e2e test (tests/aliyun_e2e.rs) uses it as a view that shares no code with the
gateway's client; `--summary` prints a short table instead.

Usage: aliyun_view.py [--summary] http://127.0.0.1:PORT REGION
Credentials: ALIBABA_CLOUD_ACCESS_KEY_ID, ALIBABA_CLOUD_ACCESS_KEY_SECRET and optionally
ALIBABA_CLOUD_SECURITY_TOKEN. The endpoint must be on loopback: the script refuses anything
else, so it can never reach a real Alibaba endpoint.
"""

import json
import os
import sys
from urllib.parse import urlparse

from alibabacloud_ecs20140526 import models as ecs
from alibabacloud_ecs20140526.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from darabonba.runtime import RuntimeOptions

IMAGE_STATES = "Creating,Waiting,Available,UnAvailable,CreateFailed,Deprecated"


def tags(item):
    return {t["TagKey"]: t.get("TagValue", "") for t in item.get("Tags", {}).get("Tag", [])}


def paged(call, make_request, outer, inner):
    """Every item of a Describe call, page by page."""
    items, page = [], 1
    while True:
        body = call(make_request(page), RuntimeOptions()).body.to_map()
        got = body.get(outer, {}).get(inner, [])
        items.extend(got)
        if not got or len(items) >= body.get("TotalCount", 0):
            return items
        page += 1


def view(client, region):
    disks = paged(
        client.describe_disks_with_options,
        lambda n: ecs.DescribeDisksRequest(region_id=region, page_number=n, page_size=100),
        "Disks",
        "Disk",
    )
    snapshots = paged(
        client.describe_snapshots_with_options,
        lambda n: ecs.DescribeSnapshotsRequest(region_id=region, page_number=n, page_size=100),
        "Snapshots",
        "Snapshot",
    )
    images = paged(
        client.describe_images_with_options,
        lambda n: ecs.DescribeImagesRequest(
            region_id=region, image_owner_alias="self", status=IMAGE_STATES, page_number=n, page_size=100
        ),
        "Images",
        "Image",
    )
    instances = paged(
        client.describe_instances_with_options,
        lambda n: ecs.DescribeInstancesRequest(region_id=region, page_number=n, page_size=100),
        "Instances",
        "Instance",
    )
    return {
        "disks": [
            {"id": d["DiskId"], "status": d["Status"], "instance": d.get("InstanceId", ""), "tags": tags(d)}
            for d in disks
        ],
        "snapshots": [
            {"id": s["SnapshotId"], "status": s["Status"], "disk": s.get("SourceDiskId", ""), "tags": tags(s)}
            for s in snapshots
        ],
        "images": [
            {"id": i["ImageId"], "status": i["Status"], "boot_mode": i.get("BootMode", ""), "tags": tags(i)}
            for i in images
        ],
        "instances": [
            {
                "id": i["InstanceId"],
                "status": i["Status"],
                "image": i.get("ImageId", ""),
                "type": i.get("InstanceType", ""),
                "tags": tags(i),
            }
            for i in instances
        ],
    }


def main():
    args = sys.argv[1:]
    summary = args[:1] == ["--summary"]
    if summary:
        args = args[1:]
    if len(args) != 2:
        sys.exit(__doc__)
    endpoint, region = args
    url = urlparse(endpoint)
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing non-loopback endpoint {endpoint!r}")
    config = Config(
        access_key_id=os.environ["ALIBABA_CLOUD_ACCESS_KEY_ID"],
        access_key_secret=os.environ["ALIBABA_CLOUD_ACCESS_KEY_SECRET"],
        security_token=os.environ.get("ALIBABA_CLOUD_SECURITY_TOKEN"),
        protocol=url.scheme,
        region_id=region,
        endpoint=url.netloc,
        read_timeout=5000,
        connect_timeout=5000,
    )
    seen = view(Client(config), region)
    if not summary:
        print(json.dumps(seen, indent=1, ensure_ascii=False))
        return
    for kind, items in seen.items():
        print(f"{kind}: {len(items)}")
        for i in items:
            extra = i.get("boot_mode") or i.get("disk") or i.get("instance") or i.get("image") or ""
            print(f"  {i['id']:<28} {i['status']:<13} {extra:<24} {i['tags'].get('sync-gateway:disk', '')}")


if __name__ == "__main__":
    main()
