"""Stand-in for MuseTalk's scripts/realtime_inference.py (0a89dec): an Avatar per YAML entry;
the main thread decodes batches (default 20) into a queue, a worker thread blends (212-236).

Like MuseTalk's worker, it stops at idx >= video_len - 1, so the last frame is never blended:
a MuseTalk quirk kept here on purpose (tests expect video_len - 1 frames, with or without GFPGAN).
"""
import argparse
import copy
import glob
import os
import queue
import threading

import cv2
import numpy as np
from omegaconf import OmegaConf

from musetalk.utils.blending import get_image_blending
from musetalk.utils.preprocessing import get_landmark_and_bbox
from musetalk.utils.utils import datagen, load_all_model

vae, unet, pe = load_all_model()
timesteps = np.zeros(1)


class Avatar:
    def __init__(self, avatar_id, video_path, bbox_shift, batch_size, result_dir):
        self.avatar_id = avatar_id
        self.avatar_path = os.path.join(result_dir, "avatars", avatar_id)
        self.batch_size = batch_size
        input_img_list = sorted(glob.glob(os.path.join(video_path, "*.png")))
        coord_list, frame_list = get_landmark_and_bbox(input_img_list, bbox_shift)
        latents = []
        for (x1, y1, x2, y2), frame in zip(coord_list, frame_list):
            crop = cv2.resize(frame[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
            latents.append(vae.get_latents_for_unet(crop))
        self.frame_list_cycle = frame_list + frame_list[::-1]
        self.coord_list_cycle = coord_list + coord_list[::-1]
        self.input_latent_list_cycle = latents + latents[::-1]
        self.idx = 0

    def process_frames(self, res_frame_queue, video_len, skip_save_images, out_dir):
        while True:
            if self.idx >= video_len - 1:
                break
            try:
                res_frame = res_frame_queue.get(block=True, timeout=1)
            except queue.Empty:
                continue
            bbox = self.coord_list_cycle[self.idx % (len(self.coord_list_cycle))]
            ori_frame = copy.deepcopy(self.frame_list_cycle[self.idx % (len(self.frame_list_cycle))])
            x1, y1, x2, y2 = bbox
            try:
                res_frame = cv2.resize(res_frame.astype(np.uint8), (x2 - x1, y2 - y1))
            except:  # noqa: E722 - MuseTalk skips a frame it cannot resize, silently
                continue
            combine_frame = get_image_blending(ori_frame, res_frame, bbox)
            if skip_save_images is False:
                cv2.imwrite(f"{out_dir}/{str(self.idx).zfill(8)}.png", combine_frame)
            self.idx = self.idx + 1

    def inference(self, audio_path, out_vid_name, fps, skip_save_images):
        out_dir = os.path.join(self.avatar_path, "tmp", out_vid_name)
        os.makedirs(out_dir, exist_ok=True)
        with open(audio_path, encoding="utf-8") as handle:
            video_num = int(handle.read().strip())
        whisper_chunks = [np.array([k], dtype=np.float32) for k in range(video_num)]
        res_frame_queue = queue.Queue()
        self.idx = 0
        process_thread = threading.Thread(target=self.process_frames,
                                          args=(res_frame_queue, video_num, skip_save_images, out_dir))
        process_thread.start()
        gen = datagen(whisper_chunks, self.input_latent_list_cycle, self.batch_size)
        for i, (whisper_batch, latent_batch) in enumerate(gen):
            audio_feature_batch = pe(whisper_batch)
            pred_latents = unet.model(latent_batch, timesteps,
                                      encoder_hidden_states=audio_feature_batch).sample
            recon = vae.decode_latents(pred_latents)
            for res_frame in recon:
                res_frame_queue.put(res_frame)
        process_thread.join()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", type=str, default="v15", choices=["v1", "v15"])
    parser.add_argument("--inference_config", type=str, default="configs/inference/realtime.yaml")
    parser.add_argument("--result_dir", default="./results")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=20)
    parser.add_argument("--skip_save_images", action="store_true")
    args = parser.parse_args()

    inference_config = OmegaConf.load(args.inference_config)
    for avatar_id in inference_config:
        video_path = inference_config[avatar_id]["video_path"]
        data_preparation = inference_config[avatar_id]["preparation"]  # noqa: F841 (as MuseTalk)
        bbox_shift = inference_config[avatar_id]["bbox_shift"]
        avatar = Avatar(avatar_id, video_path, bbox_shift, args.batch_size, args.result_dir)
        for audio_num, audio_path in inference_config[avatar_id]["audio_clips"].items():
            avatar.inference(audio_path, audio_num, args.fps, args.skip_save_images)
