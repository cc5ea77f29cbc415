r"""FML in the DOM setting: non-IID data, heterogeneous local models, on MNIST.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/fml_dom.py --workdir=/tmp/fml_dom

10 clients with Dirichlet(0.1) label skew and at most 100 training examples each;
local models assigned round-robin from three architectures (three groups), the
meme is the global MLP. Compare with local-only training on the same split:

  ... --config.algorithm=local --workdir=/tmp/local_dom

Variations from the paper's experiments (one flag each):
  objective heterogeneity  --config.client_tasks=full,parity
  catfish                  --config.catfish_clients=0 --config.catfish_model=cnn
  dynamic balance          --config.fml.alpha_schedule=official --config.fml.beta=0.1
                           --config.fml.beta_schedule=official --config.fml.lr_schedule=official
"""

from fml_jax.configs import default


def get_config():
  c = default.get_config()
  c.algorithm = "fml"
  c.dataset = "mnist"
  c.partition = "dirichlet"
  c.dirichlet_alpha = 0.1
  c.num_clients = 10
  c.clients_per_round = 10
  c.client_max_examples = 100
  c.model = "mlp"
  c.local_models = "mlp_small,mlp,lenet5"
  c.num_rounds = 50
  c.local_epochs = 2
  c.batch_size = 32
  return c
