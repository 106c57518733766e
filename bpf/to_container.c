/* tc egress of an endpoint's host-side veth: packets entering the pod (its ingress policy). */
#include "lib/enforce.h"

int to_container(struct __sk_buff *skb)
{
    return enforce(skb, DIR_INGRESS);
}
