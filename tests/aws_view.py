#!/usr/bin/env python3
"""What an independent EC2 client (boto3) sees in an EC2 endpoint: the volumes, snapshots,
images and instances the gateway made (tag sync-gateway:managed=true), as one JSON document.

Used by tests/aws_e2e.rs and scripts/e2e-aws to check the gateway's work with a client that
shares no code with it. Loopback endpoints only, static test credentials, no metadata lookups.

    aws_view.py http://127.0.0.1:5000 [--region us-east-1] [--summary]

--summary prints one line per resource for people instead of the JSON.
"""

import argparse
import json
import os
import sys

import boto3

MANAGED = [{"Name": "tag:sync-gateway:managed", "Values": ["true"]}]


def tags(resource):
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("endpoint")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--summary", action="store_true")
    a = p.parse_args()
    host = a.endpoint.split("//", 1)[-1].split(":", 1)[0].split("/", 1)[0]
    if not (host == "localhost" or host.startswith("127.")):
        sys.exit(f"refusing a non-loopback endpoint: {a.endpoint}")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    ec2 = boto3.client(
        "ec2",
        endpoint_url=a.endpoint,
        region_name=a.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    volumes = [
        {
            "id": v["VolumeId"],
            "state": v["State"],
            "size_gib": v["Size"],
            "type": v.get("VolumeType"),
            "encrypted": v.get("Encrypted"),
            "attachments": [
                {"instance": x["InstanceId"], "device": x["Device"], "state": x["State"]}
                for x in v.get("Attachments", [])
            ],
            "tags": tags(v),
        }
        for v in ec2.describe_volumes(Filters=MANAGED)["Volumes"]
    ]
    snapshots = [
        {
            "id": s["SnapshotId"],
            "state": s["State"],
            "volume": s.get("VolumeId"),
            "tags": tags(s),
        }
        for s in ec2.describe_snapshots(OwnerIds=["self"], Filters=MANAGED)["Snapshots"]
    ]
    images = [
        {
            "id": i["ImageId"],
            "name": i.get("Name"),
            "state": i.get("State"),
            "root_device": i.get("RootDeviceName"),
            "mappings": [
                {"device": m.get("DeviceName"), "snapshot": m.get("Ebs", {}).get("SnapshotId")}
                for m in i.get("BlockDeviceMappings", [])
            ],
            "tags": tags(i),
        }
        for i in ec2.describe_images(Owners=["self"])["Images"]
        if (i.get("Name") or "").startswith("sync-gateway ")
    ]
    instances = [
        {
            "id": i["InstanceId"],
            "state": i["State"]["Name"],
            "image": i.get("ImageId"),
            "type": i.get("InstanceType"),
            "tags": tags(i),
        }
        for r in ec2.describe_instances(Filters=MANAGED)["Reservations"]
        for i in r["Instances"]
    ]
    view = {"volumes": volumes, "snapshots": snapshots, "images": images, "instances": instances}
    if a.summary:
        summary(view)
    else:
        json.dump(view, sys.stdout, indent=2)
        print()


def summary(view):
    def tag(r, k):
        return r["tags"].get(k, "-")

    for s in view["snapshots"]:
        disk, cp = tag(s, "sync-gateway:disk"), tag(s, "sync-gateway:checkpoint")
        print(f"snapshot {s['id']:<24} {s['state']:<10} disk {disk:<8} checkpoint {cp}")
    for i in view["images"]:
        print(f"image    {i['id']:<24} {i['state']:<10} {i['name']}")
    for i in view["instances"]:
        launch, disk = tag(i, "sync-gateway:launch"), tag(i, "sync-gateway:disk")
        print(f"instance {i['id']:<24} {i['state']:<10} launch {launch:<8} disk {disk}")
    for v in view["volumes"]:
        print(f"volume   {v['id']:<24} {v['state']:<10} {v['size_gib']} GiB, {tag(v, 'Name')}")


if __name__ == "__main__":
    main()
